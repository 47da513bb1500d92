//! The rides example: a small ride-hailing flow on polybus.
//!
//! * the **rides service** publishes `RideCreated` on `rides`;
//! * the **ride matcher** (group `ride-matcher`) consumes it and publishes
//!   `ChauffeurFound` on `rides-fulfillment`;
//! * the rides service (group `rides-service`) consumes that and publishes
//!   `RideAccepted` on `rides`;
//! * an **email sender** (group `ride-emails`) "emails" the rider on `RideAccepted`,
//!   added without any change to the rides service;
//! * a **projection** rebuilds each ride's state by replaying `rides` from the
//!   start in catch-up mode, and serves once it has caught up; then it answers
//!   "what was this ride's state at time T" by replaying the log from the
//!   beginning up to T (on a broker that can replay its log).
//!
//! Events are typed (`RideCreated`, `ChauffeurFound`, `RideAccepted`, each with
//! its CloudEvents type and its ride id as key), handlers take the event and
//! extractors (`State`, `Publisher`, `Meta`) instead of raw deliveries, one
//! router per service dispatches `rides` by event type, and everything goes on
//! the wire as CloudEvents in the broker's binding.
//!
//! Runs on the in-memory broker by default; set `POLYBUS_URL` (e.g.
//! `kafka://127.0.0.1:9092`) to run it on any broker compiled in.
//!
//! ```text
//! cargo run --example rides
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use polybus::middleware;
use polybus::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const RIDES: &str = "rides";
const FULFILLMENT: &str = "rides-fulfillment";

/// A rider asked for a ride (on `rides`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RideCreated {
    ride_id: String,
    rider: String,
    pickup: String,
}
event!(RideCreated => "rides.ride-created", key = |e| &e.ride_id);

/// The matcher found a chauffeur (on `rides-fulfillment`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChauffeurFound {
    ride_id: String,
    chauffeur: String,
}
event!(ChauffeurFound => "rides.chauffeur-found", key = |e| &e.ride_id);

/// The rides service accepted the match (on `rides`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RideAccepted {
    ride_id: String,
    chauffeur: String,
}
event!(RideAccepted => "rides.ride-accepted", key = |e| &e.ride_id);

/// A ride's state, as the projection rebuilds it from its events.
#[derive(Debug, Clone, Default)]
struct RideView {
    rider: String,
    pickup: String,
    chauffeur: Option<String>,
    events: usize,
    /// When the ride was accepted (its event's CloudEvents `time`).
    accepted_at: Option<SystemTime>,
}

/// The projection's state, shared by its handlers: the views, and the point
/// in time it is rebuilt up to (`None`: everything).
#[derive(Clone, Default)]
struct Projection {
    views: Arc<Mutex<BTreeMap<String, RideView>>>,
    until: Option<SystemTime>,
}

impl Projection {
    /// A projection of the events that happened at or before `t`.
    fn as_of(t: SystemTime) -> Self {
        Projection {
            until: Some(t),
            ..Projection::default()
        }
    }

    /// Whether an event (by its CloudEvents `time`) belongs in this projection.
    fn applies(&self, meta: &Meta) -> bool {
        match (self.until, meta.time()) {
            (Some(until), Some(time)) => time <= until,
            _ => true,
        }
    }

    fn view(&self, ride_id: &str) -> Option<RideView> {
        self.views.lock().expect("projection lock").get(ride_id).cloned()
    }
}

/// The matcher's state: the chauffeurs on duty.
#[derive(Clone)]
struct Fleet {
    chauffeurs: Arc<Vec<String>>,
}

// The ride matcher: RideCreated -> ChauffeurFound.
async fn match_chauffeur(ride: RideCreated, State(fleet): State<Fleet>, out: Publisher) -> HandlerResult {
    let pick = usize::from(ride.ride_id.bytes().last().unwrap_or(0)) % fleet.chauffeurs.len();
    let chauffeur = fleet.chauffeurs[pick].clone();
    println!(
        "[ride-matcher]  {}: found {chauffeur} near {}",
        ride.ride_id, ride.pickup
    );
    let found = ChauffeurFound {
        ride_id: ride.ride_id,
        chauffeur,
    };
    out.publish(FULFILLMENT, &found).await?;
    Ok(())
}

// The rides service: ChauffeurFound -> RideAccepted.
async fn accept_ride(found: ChauffeurFound, out: Publisher) -> HandlerResult {
    println!(
        "[rides-service] {}: accepted by {}",
        found.ride_id, found.chauffeur
    );
    let accepted = RideAccepted {
        ride_id: found.ride_id,
        chauffeur: found.chauffeur,
    };
    out.publish(RIDES, &accepted).await?;
    Ok(())
}

// A new consumer group, added without touching the rides service.
async fn email_rider(
    accepted: RideAccepted,
    meta: Meta,
    State(emailed): State<mpsc::UnboundedSender<String>>,
) -> HandlerResult {
    println!(
        "[ride-emails]   {}: emailing the rider that {} is on the way (CloudEvent {} from {})",
        accepted.ride_id,
        accepted.chauffeur,
        meta.event_type().unwrap_or("-"),
        meta.source().unwrap_or("-"),
    );
    let _ = emailed.send(accepted.ride_id);
    Ok(())
}

// The projection: each event type updates the ride's view.
async fn project_created(
    ride: RideCreated,
    meta: Meta,
    State(projection): State<Projection>,
) -> HandlerResult {
    if !projection.applies(&meta) {
        return Ok(());
    }
    let mut views = projection.views.lock().expect("projection lock");
    let view = views.entry(ride.ride_id).or_default();
    view.rider = ride.rider;
    view.pickup = ride.pickup;
    view.events += 1;
    Ok(())
}

async fn project_accepted(
    accepted: RideAccepted,
    meta: Meta,
    State(projection): State<Projection>,
) -> HandlerResult {
    if !projection.applies(&meta) {
        return Ok(());
    }
    let mut views = projection.views.lock().expect("projection lock");
    let view = views.entry(accepted.ride_id).or_default();
    view.chauffeur = Some(accepted.chauffeur);
    view.accepted_at = meta.time();
    view.events += 1;
    Ok(())
}

/// The projection's router: one handler per event type on `rides`.
fn projection_router(bus: &Connection, projection: Projection) -> Router<Projection> {
    Events::new(bus, projection)
        .router()
        .on(project_created)
        .on(project_accepted)
}

/// The ride's state as of `t`: replays `rides` from the beginning in catch-up
/// mode (no group: nothing is kept once it ends), applying only the events
/// that happened at or before `t`, and stops at the end of the log as it was.
async fn state_at(
    bus: &Connection,
    ride_id: &str,
    t: SystemTime,
) -> Result<Option<RideView>, Box<dyn std::error::Error>> {
    let projection = Projection::as_of(t);
    let replay = bus
        .runner()
        .topic(RIDES)
        .start(StartFrom::Earliest)
        .order(Order::ByKey)
        .catch_up(CatchUp::Stop)
        .run(projection_router(bus, projection.clone()))
        .await?;
    let report = tokio::time::timeout(Duration::from_secs(30), replay.wait())
        .await
        .map_err(|_| "timed out replaying to a point in time")?;
    if report.ended != Some(Ended::CaughtUp) {
        return Err(format!("the replay did not catch up: {report:?}").into());
    }
    Ok(projection.view(ride_id))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let url = std::env::var("POLYBUS_URL").unwrap_or_else(|_| "memory://rides-example".into());
    let bus = polybus::connect(&url).await?;
    let caps = bus.consumer.capabilities();
    println!(
        "connected to {} ({} backend, CloudEvents {:?} binding)",
        polybus::redact_url(&url),
        caps.backend,
        caps.binding
    );
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let timeout = Duration::from_secs(30);

    // Declare topics and groups up front: a declared group keeps every message
    // published from now on, even before its consumer starts.
    let projection_group = format!("ride-projection-{run}");
    bus.consumer.declare_topic(RIDES).await?;
    bus.consumer.declare_topic(FULFILLMENT).await?;
    bus.consumer
        .declare_group(RIDES, "ride-matcher", StartFrom::Latest)
        .await?;
    bus.consumer
        .declare_group(FULFILLMENT, "rides-service", StartFrom::Latest)
        .await?;
    bus.consumer
        .declare_group(RIDES, "ride-emails", StartFrom::Latest)
        .await?;
    bus.consumer
        .declare_group(RIDES, &projection_group, StartFrom::Earliest)
        .await?;

    // Each service gets its typed side: its state and its CloudEvents source.
    let fleet = Fleet {
        chauffeurs: Arc::new(vec![
            "chauffeur-1".into(),
            "chauffeur-2".into(),
            "chauffeur-3".into(),
        ]),
    };
    let matcher_events = Events::new(&bus, fleet).with_source("/ride-matcher");
    // `rides` carries RideCreated and RideAccepted: the router takes the first
    // and acknowledges (and counts) the types it has no handler for.
    let matcher = bus
        .runner()
        .topic(RIDES)
        .group("ride-matcher")
        .layer(middleware::tracing())
        .run(matcher_events.router().on(match_chauffeur))
        .await?;

    let rides_events = Events::new(&bus, ()).with_source("/rides-service");
    let rides_service = bus
        .runner()
        .topic(FULFILLMENT)
        .group("rides-service")
        .layer(middleware::tracing())
        .run(rides_events.handler(accept_ride))
        .await?;

    let (emailed_tx, mut emailed) = mpsc::unbounded_channel();
    let emails = bus
        .runner()
        .topic(RIDES)
        .group("ride-emails")
        .run(Events::new(&bus, emailed_tx).router().on(email_rider))
        .await?;

    // The rides service publishes three rides.
    let ride_ids: Vec<String> = (1..=3).map(|i| format!("ride-{run}-{i}")).collect();
    for (ride_id, (rider, pickup)) in ride_ids.iter().zip([
        ("ada", "Main St 1"),
        ("grace", "Harbour 7"),
        ("alan", "Station Sq"),
    ]) {
        let created = RideCreated {
            ride_id: ride_id.clone(),
            rider: rider.into(),
            pickup: pickup.into(),
        };
        // Sent as a CloudEvent: type `rides.ride-created`, key and subject the ride id.
        rides_events.publisher().publish(RIDES, &created).await?;
        println!("[rides-service] {ride_id}: created for {rider}");
    }

    let mut pending: Vec<&String> = ride_ids.iter().collect();
    while !pending.is_empty() {
        let ride_id = tokio::time::timeout(timeout, emailed.recv())
            .await
            .map_err(|_| "timed out waiting for the emails")?
            .ok_or("the email sender stopped")?;
        pending.retain(|id| **id != ride_id);
    }

    // A broker that keeps nothing before a consumer starts (core NATS) has
    // nothing to rebuild a projection from.
    let mut runs = vec![
        ("ride-matcher", matcher),
        ("rides-service", rides_service),
        ("ride-emails", emails),
    ];
    if !caps.at_least_once {
        println!(
            "[projection]    {} keeps no messages for a consumer that is not running; skipping the projection",
            caps.backend
        );
    } else {
        // The projection rebuilds every ride from the start of `rides` (in order
        // per ride: ordering by key) in catch-up mode, and serves once it has
        // applied every event that was in the log when it started; then it
        // keeps following the log.
        let projection = Projection::default();
        let catch_up = caps.catch_up && caps.replay;
        let mut runner = bus
            .runner()
            .topic(RIDES)
            .group(projection_group.as_str())
            .start(StartFrom::Earliest)
            .order(Order::ByKey);
        if catch_up {
            runner = runner.catch_up(CatchUp::Follow);
        }
        let projection_run = runner.run(projection_router(&bus, projection.clone())).await?;
        if catch_up {
            tokio::time::timeout(timeout, projection_run.caught_up())
                .await
                .map_err(|_| "timed out rebuilding the projection")??;
            println!("[projection]    caught up with `{RIDES}`; serving:");
        } else {
            // No catch-up here: wait for the events this example published.
            println!(
                "[projection]    {} cannot tell where its log ends (no catch-up mode); waiting for this run's events",
                caps.backend
            );
            let complete = || {
                ride_ids
                    .iter()
                    .all(|id| projection.view(id).is_some_and(|v| v.events >= 2))
            };
            tokio::time::timeout(timeout, async {
                while !complete() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .map_err(|_| "timed out waiting for the projection")?;
            println!("[projection]    rebuilt; serving:");
        }
        for ride_id in &ride_ids {
            if let Some(view) = projection.view(ride_id) {
                println!(
                    "                {ride_id}: rider {}, pickup {}, chauffeur {}",
                    view.rider,
                    view.pickup,
                    view.chauffeur.as_deref().unwrap_or("-")
                );
            }
        }

        // The first ride's state at a point in time, by replaying the log from
        // the beginning up to that time: just before it was accepted it had no
        // chauffeur yet.
        if !catch_up {
            println!(
                "[projection]    {} cannot replay its log; skipping the state at a point in time",
                caps.backend
            );
        } else if let Some(accepted_at) = projection.view(&ride_ids[0]).and_then(|v| v.accepted_at) {
            let before = accepted_at.checked_sub(Duration::from_millis(1));
            for t in before.into_iter().chain([accepted_at]) {
                let view = state_at(&bus, &ride_ids[0], t).await?;
                println!(
                    "[projection]    {} as of {}: chauffeur {}",
                    ride_ids[0],
                    polybus::time::to_rfc3339(t),
                    view.as_ref().and_then(|v| v.chauffeur.as_deref()).unwrap_or("-"),
                );
            }
        }
        runs.push(("projection", projection_run));
    }

    // Graceful shutdown: in-flight handlers finish and are acked first.
    for (name, handle) in runs {
        // A health probe would read this while the service runs.
        let state = handle.state();
        let report = handle.shutdown(Duration::from_secs(10)).await;
        println!(
            "[shutdown]      {name} (was {state:?}): handled {}, dead-lettered {}, released {}",
            report.handled, report.dead_lettered, report.released
        );
        if let Some(error) = report.error() {
            // The runner had stopped by itself: a dead consumer is not a clean stop.
            return Err(format!("{name} failed: {error}").into());
        }
    }
    bus.close().await?;
    println!("done");
    Ok(())
}
