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
//! Runs on the in-memory broker by default; set `POLYBUS_URL` (e.g.
//! `kafka://127.0.0.1:9092`) to run it on any broker compiled in.
//!
//! ```text
//! cargo run --example rides
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polybus::prelude::*;
use polybus::{Delivery, middleware};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const RIDES: &str = "rides";
const FULFILLMENT: &str = "rides-fulfillment";

/// Events about a ride, on the `rides` topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
enum RideEvent {
    RideCreated {
        ride_id: String,
        rider: String,
        pickup: String,
    },
    RideAccepted {
        ride_id: String,
        chauffeur: String,
    },
}

/// Events of the matching process, on `rides-fulfillment`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
enum FulfillmentEvent {
    ChauffeurFound { ride_id: String, chauffeur: String },
}

/// A ride's state, as the projection rebuilds it.
#[derive(Debug, Clone, Default)]
struct RideView {
    rider: String,
    pickup: String,
    chauffeur: Option<String>,
    events: usize,
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
    println!(
        "connected to {} ({} backend)",
        polybus::redact_url(&url),
        bus.consumer.capabilities().backend
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

    // The ride matcher: RideCreated -> ChauffeurFound.
    let producer = Arc::clone(&bus.producer);
    let matcher = bus
        .runner()
        .topic(RIDES)
        .group("ride-matcher")
        .layer(middleware::tracing())
        .run(move |delivery: Delivery| {
            let producer = Arc::clone(&producer);
            async move {
                if let RideEvent::RideCreated { ride_id, pickup, .. } = delivery.json()? {
                    let chauffeur = format!("chauffeur-{}", ride_id.bytes().last().unwrap_or(0) % 3 + 1);
                    println!("[ride-matcher]  {ride_id}: found {chauffeur} near {pickup}");
                    let found = FulfillmentEvent::ChauffeurFound {
                        ride_id: ride_id.clone(),
                        chauffeur,
                    };
                    producer.send_json_keyed(FULFILLMENT, &ride_id, &found).await?;
                }
                Ok(())
            }
        })
        .await?;

    // The rides service: ChauffeurFound -> RideAccepted.
    let producer = Arc::clone(&bus.producer);
    let rides_service = bus
        .runner()
        .topic(FULFILLMENT)
        .group("rides-service")
        .layer(middleware::tracing())
        .run(move |delivery: Delivery| {
            let producer = Arc::clone(&producer);
            async move {
                let FulfillmentEvent::ChauffeurFound { ride_id, chauffeur } = delivery.json()?;
                println!("[rides-service] {ride_id}: accepted by {chauffeur}");
                let accepted = RideEvent::RideAccepted {
                    ride_id: ride_id.clone(),
                    chauffeur,
                };
                producer.send_json_keyed(RIDES, &ride_id, &accepted).await?;
                Ok(())
            }
        })
        .await?;

    // A new consumer group, added without touching the rides service.
    let (emailed_tx, mut emailed) = mpsc::unbounded_channel();
    let emails = bus
        .runner()
        .topic(RIDES)
        .group("ride-emails")
        .run(move |delivery: Delivery| {
            let emailed = emailed_tx.clone();
            async move {
                if let RideEvent::RideAccepted { ride_id, chauffeur } = delivery.json()? {
                    println!("[ride-emails]   {ride_id}: emailing the rider that {chauffeur} is on the way");
                    let _ = emailed.send(ride_id);
                }
                Ok(())
            }
        })
        .await?;

    // The rides service publishes three rides.
    let ride_ids: Vec<String> = (1..=3).map(|i| format!("ride-{run}-{i}")).collect();
    for (ride_id, (rider, pickup)) in ride_ids.iter().zip([
        ("ada", "Main St 1"),
        ("grace", "Harbour 7"),
        ("alan", "Station Sq"),
    ]) {
        let created = RideEvent::RideCreated {
            ride_id: ride_id.clone(),
            rider: rider.into(),
            pickup: pickup.into(),
        };
        bus.producer.send_json_keyed(RIDES, ride_id, &created).await?;
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

    // The projection replays `rides` from the start and rebuilds each ride.
    let views: Arc<Mutex<BTreeMap<String, RideView>>> = Arc::default();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let projection = bus
        .runner()
        .topic(RIDES)
        .group(projection_group.as_str())
        .start(StartFrom::Earliest)
        .order(Order::ByKey)
        .run({
            let views = Arc::clone(&views);
            move |delivery: Delivery| {
                let (views, seen) = (Arc::clone(&views), seen_tx.clone());
                async move {
                    let event: RideEvent = delivery.json()?;
                    let mut views = views.lock().expect("projection lock");
                    match event {
                        RideEvent::RideCreated {
                            ride_id,
                            rider,
                            pickup,
                        } => {
                            let view = views.entry(ride_id).or_default();
                            view.rider = rider;
                            view.pickup = pickup;
                            view.events += 1;
                        }
                        RideEvent::RideAccepted { ride_id, chauffeur } => {
                            let view = views.entry(ride_id).or_default();
                            view.chauffeur = Some(chauffeur);
                            view.events += 1;
                        }
                    }
                    let _ = seen.send(());
                    Ok(())
                }
            }
        })
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
