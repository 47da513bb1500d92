//! The rides example: a small ride-hailing flow on polybus.
//!
//! * the **rides service** publishes `RideCreated` on `rides`;
//! * the **ride matcher** (group `ride-matcher`) consumes it and publishes
//!   `ChauffeurFound` on `rides-fulfillment`;
//! * the rides service (group `rides-service`) consumes that and publishes
//!   `RideAccepted` on `rides`;
//! * an **email sender** (group `ride-emails`) "emails" the rider on `RideAccepted`,
//!   added without any change to the rides service;
//! * a **projection** rebuilds each ride's state by replaying `rides` from the start.
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
    /// When each event happened (its CloudEvents `time`), to answer "what was
    /// the ride's state at time T" from the same events.
    created_at: Option<SystemTime>,
    accepted_at: Option<SystemTime>,
}

impl RideView {
    /// The chauffeur as of `t`: the events up to `t`, applied in order.
    fn chauffeur_at(&self, t: SystemTime) -> Option<&str> {
        self.accepted_at
            .filter(|at| *at <= t)
            .and(self.chauffeur.as_deref())
    }
}

/// The projection's state, shared by its handlers.
type Views = Arc<Mutex<BTreeMap<String, RideView>>>;

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
async fn project_created(ride: RideCreated, meta: Meta, State(views): State<Views>) -> HandlerResult {
    let mut views = views.lock().expect("projection lock");
    let view = views.entry(ride.ride_id).or_default();
    view.rider = ride.rider;
    view.pickup = ride.pickup;
    view.created_at = meta.time();
    view.events += 1;
    Ok(())
}

async fn project_accepted(accepted: RideAccepted, meta: Meta, State(views): State<Views>) -> HandlerResult {
    let mut views = views.lock().expect("projection lock");
    let view = views.entry(accepted.ride_id).or_default();
    view.chauffeur = Some(accepted.chauffeur);
    view.accepted_at = meta.time();
    view.events += 1;
    Ok(())
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

    // The projection replays `rides` from the start and rebuilds each ride
    // from its events, in order per ride (ordering by key).
    let views: Views = Arc::default();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<()>();
    let notify = polybus::from_fn(move |delivery: polybus::Delivery, next: polybus::Next| {
        let seen = seen_tx.clone();
        async move {
            let result = next.run(delivery).await;
            let _ = seen.send(());
            result
        }
    });
    let projection = bus
        .runner()
        .topic(RIDES)
        .group(projection_group.as_str())
        .start(StartFrom::Earliest)
        .order(Order::ByKey)
        .layer(notify)
        .run(
            Events::new(&bus, Arc::clone(&views))
                .router()
                .on(project_created)
                .on(project_accepted),
        )
        .await?;
    let replayed = async {
        loop {
            let done = {
                let views = views.lock().expect("projection lock");
                ride_ids
                    .iter()
                    .all(|id| views.get(id).is_some_and(|v| v.events >= 2))
            };
            if done {
                break;
            }
            if seen.recv().await.is_none() {
                break;
            }
        }
    };
    tokio::time::timeout(timeout, replayed)
        .await
        .map_err(|_| "timed out waiting for the projection")?;
    println!("[projection]    rebuilt from the start of `{RIDES}`:");
    for (ride_id, view) in views.lock().expect("projection lock").iter() {
        if ride_ids.contains(ride_id) {
            println!(
                "                {ride_id}: rider {}, pickup {}, chauffeur {}",
                view.rider,
                view.pickup,
                view.chauffeur.as_deref().unwrap_or("-")
            );
        }
    }
    // State at a point in time, from the same events: just before the first
    // ride was accepted, it had no chauffeur yet.
    if let Some(view) = views.lock().expect("projection lock").get(&ride_ids[0])
        && let Some(accepted_at) = view.accepted_at
        && let Some(before) = accepted_at.checked_sub(Duration::from_millis(1))
    {
        println!(
            "[projection]    {} at {}: chauffeur {}; at {}: chauffeur {}",
            ride_ids[0],
            polybus::time::to_rfc3339(before),
            view.chauffeur_at(before).unwrap_or("-"),
            polybus::time::to_rfc3339(accepted_at),
            view.chauffeur_at(accepted_at).unwrap_or("-"),
        );
    }

    // Graceful shutdown: in-flight handlers finish and are acked first.
    for (name, handle) in [
        ("ride-matcher", matcher),
        ("rides-service", rides_service),
        ("ride-emails", emails),
        ("projection", projection),
    ] {
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
