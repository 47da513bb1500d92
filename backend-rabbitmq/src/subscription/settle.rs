//! Settling a delivery: ack and release, through the channel's coalescing
//! acknowledger ([`crate::acks`]) or, with coalescing off, lapin's acker of the
//! delivery; either way `NotSettled` when the channel is lost first.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use polybus_core::{AckHandle, Error, Result};

use crate::acks::{Acks, outcome};
use crate::errors::alive as alive_channel;

pub(super) struct RabbitAck {
    /// lapin's acker of the delivery: its channel, single use, poisoned when
    /// the channel dies (the channel-generation guard).
    pub(super) acker: lapin::Acker,
    /// The delivery's tag on its channel.
    pub(super) tag: u64,
    /// The channel's coalescing acknowledger (`None`: coalescing is off).
    pub(super) acks: Option<Acks>,
    /// Ends (the sender is dropped) when the subscription sees the delivery's
    /// connection lost.
    pub(super) alive: tokio::sync::watch::Receiver<()>,
    /// The delivery's channel, watched while settling: the subscription only
    /// sees a lost connection when the runner pulls, which a full runner does not.
    pub(super) channel: Option<Channel>,
}

impl RabbitAck {
    /// Settles, unless the delivery's connection is lost first: lapin does not
    /// always resolve a settlement queued just as its connection failed (seen
    /// after a parse failure: the ack never returned, so the key's lane stayed
    /// blocked until the runner's settle timeout, and with prefetch 1 nothing
    /// else was delivered meanwhile).
    async fn until_lost(
        &self,
        operation: &'static str,
        settling: impl Future<Output = Result<()>>,
    ) -> Result<()> {
        let mut alive = self.alive.clone();
        let channel = self.channel.clone();
        let channel_gone = async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if channel.as_ref().is_none_or(|c| !alive_channel(c)) {
                    return;
                }
            }
        };
        tokio::select! {
            biased;
            result = settling => result,
            _ = channel_gone => Err(Error::NotSettled {
                operation,
                reason: "the delivery's channel is gone; the broker redelivers it".into(),
            }),
            _ = alive.changed() => Err(Error::NotSettled {
                operation,
                reason: "the delivery's connection was lost; the broker redelivers it".into(),
            }),
        }
    }
}

#[async_trait]
impl AckHandle for RabbitAck {
    async fn ack(&self) -> Result<()> {
        match &self.acks {
            Some(acks) => {
                self.until_lost("ack", acks.ack(self.tag, self.acker.clone()))
                    .await
            }
            None => {
                let acking = async { outcome("ack", &self.acker.ack(BasicAckOptions::default()).await) };
                self.until_lost("ack", acking).await
            }
        }
    }

    async fn release(&self, _delay: Option<Duration>) -> Result<()> {
        match &self.acks {
            Some(acks) => {
                self.until_lost("release", acks.release(self.tag, self.acker.clone()))
                    .await
            }
            None => {
                let options = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                let releasing = async { outcome("release", &self.acker.nack(options).await) };
                self.until_lost("release", releasing).await
            }
        }
    }
}
