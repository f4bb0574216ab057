//! The two consuming loops, side by side: [`queue`] consumes the one request
//! queue, [`partitions`] the partition queues this worker owns in a fleet
//! (`QTY_PARTITIONS`). Neither knows the other; both take [`Consuming`], what
//! they share, from the worker that chose between them.

pub mod partitions;
pub mod queue;

use crate::broker::{Addresses, Topology};
use crate::delivery::Context;
use crate::settings::Settings;
use crate::store::Database;
use crate::store::parked::Sources;
use std::sync::Arc;
use tokio::sync::watch;

/// What both loops share: the settings, the delivery context, the database,
/// the broker's addresses and topology, and which queues' parked requests this
/// worker judges (the loop says, as it takes and gives up queues).
pub struct Consuming {
    pub settings: Settings,
    pub ctx: Arc<Context>,
    pub db: Database,
    pub addresses: Arc<Addresses>,
    pub topology: Arc<Topology>,
    pub sources: watch::Sender<Sources>,
}

impl Consuming {
    /// The parked requests' sources of a worker that consumes `mine` now.
    pub fn consumes(&self, mine: Vec<String>) {
        self.sources.send_if_modified(|sources| {
            let changed = sources.mine != mine;
            sources.mine = mine;
            changed
        });
    }
}
