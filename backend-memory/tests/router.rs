//! The typed router's registrations, on the in-memory broker.

use polybus_core::typed::Events;
use polybus_core::{Error, HandlerResult, event};
use polybus_memory::MemoryBroker;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct RideCreated {
    ride_id: String,
}
event!(RideCreated => "rides.ride-created");

#[derive(Serialize, Deserialize)]
struct RideAccepted {
    ride_id: String,
}
event!(RideAccepted => "rides.ride-accepted");

async fn on_created(_: RideCreated) -> HandlerResult {
    Ok(())
}

async fn on_created_again(_: RideCreated) -> HandlerResult {
    Ok(())
}

async fn on_accepted(_: RideAccepted) -> HandlerResult {
    Ok(())
}

/// Two handlers for one event type is a configuration error naming the type,
/// found before anything runs (it used to replace the first handler silently).
#[tokio::test]
async fn registering_a_type_twice_is_refused() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer.declare_topic("rides").await.unwrap();
    let events = Events::new(&conn, ());
    let router = events
        .router()
        .on(on_created)
        .on(on_accepted)
        .on(on_created_again);
    let invalid = router.validate();
    assert!(
        matches!(&invalid, Err(Error::InvalidConfig(m)) if m.contains("\"rides.ride-created\"") && !m.contains("accepted")),
        "{invalid:?}"
    );
    let refused = conn.runner().topic("rides").run(router).await;
    assert!(
        matches!(&refused, Err(Error::InvalidConfig(m)) if m.contains("rides.ride-created")),
        "{refused:?}"
    );
    let fine = events.router().on(on_created).on(on_accepted);
    assert!(fine.validate().is_ok());
    let handle = conn.runner().topic("rides").run(fine).await.unwrap();
    assert!(
        handle
            .shutdown(std::time::Duration::from_secs(5))
            .await
            .is_clean()
    );
}

/// A refused router is refused before `run` subscribes: the group it names
/// is not declared (which would fix its start), and on a broker with groups
/// no member joins and leaves (a rebalance for the live ones).
#[tokio::test]
async fn a_refused_router_declares_nothing() {
    let broker = MemoryBroker::new();
    let conn = broker.connection();
    conn.consumer.declare_topic("rides").await.unwrap();
    let events = Events::new(&conn, ());
    let router = events.router().on(on_created).on(on_created_again);
    let refused = conn
        .runner()
        .topic("rides")
        .group("projection")
        .start(polybus_core::StartFrom::Earliest)
        .catch_up(polybus_core::CatchUp::Stop)
        .run(router)
        .await;
    assert!(matches!(&refused, Err(Error::InvalidConfig(_))), "{refused:?}");
    let lag = conn.consumer.lag("rides", "projection").await;
    assert!(
        matches!(lag, Err(Error::NotFound { .. })),
        "the refused run declared the group: lag = {lag:?}"
    );
}
