//! The deliveries file, followed while the sidecar runs. Every second it looks at the
//! modification time and size of the file and of those it names (`ca_file`, client
//! certificate and key); on a change it reads the file again. A
//! delivery added starts; one removed stops after the event in hand on each partition (its
//! offsets committed); one changed (any field, or the content of a file it names) stops the same
//! way and starts again with its new settings, from its group's committed offsets. A file
//! that no longer parses changes nothing: the running deliveries go on, and the error names
//! the field, as at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::Delivery;
use super::worker::{self, Shared, WorkerError};

const CHECK_EVERY: Duration = Duration::from_secs(1);

struct Running {
    delivery: Delivery,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The deliveries running, by name.
pub struct Deliveries {
    path: PathBuf,
    shared: Shared,
    running: BTreeMap<String, Running>,
}

impl Deliveries {
    /// Starts every delivery of the file as read at start; one that cannot start stops the
    /// start.
    pub fn start(
        path: &Path,
        deliveries: Vec<Delivery>,
        shared: Shared,
    ) -> Result<Deliveries, WorkerError> {
        let mut all = Deliveries {
            path: path.to_owned(),
            shared,
            running: BTreeMap::new(),
        };
        for delivery in deliveries {
            all.launch(delivery)?;
        }
        Ok(all)
    }

    /// Follows the file until `stop`, then stops every delivery and waits for each.
    pub async fn follow(mut self, mut stop: watch::Receiver<bool>) {
        let mut seen = self.stamps();
        let mut every = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => break,
                _ = every.tick() => {}
            }
            if self.stamps() != seen {
                self.reload().await;
                // What the new settings name (another `ca_file`) is watched from now on.
                seen = self.stamps();
            }
        }
        let running = std::mem::take(&mut self.running);
        stop_all(running.into_iter()).await;
    }

    async fn reload(&mut self) {
        let wanted = match super::load(&self.path) {
            Ok(deliveries) => deliveries,
            Err(e) => {
                tracing::error!(error = %e, "deliveries file not reloaded: the running deliveries go on unchanged");
                self.shared.metrics.deliveries_reloaded("refused");
                return;
            }
        };
        let mut wanted: BTreeMap<String, Delivery> =
            wanted.into_iter().map(|d| (d.name.clone(), d)).collect();
        let going: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| wanted.get(*name) != Some(&r.delivery))
            .map(|(name, _)| name.clone())
            .collect();
        let stopping = going
            .iter()
            .filter_map(|name| Some((name.clone(), self.running.remove(name)?)));
        stop_all(stopping).await;
        for name in &going {
            let how = if wanted.contains_key(name) {
                "changed: started again with its new settings"
            } else {
                "removed from the deliveries file"
            };
            tracing::info!(delivery = %name, "delivery {how}");
        }
        wanted.retain(|name, _| !self.running.contains_key(name));
        for delivery in wanted.into_values() {
            let name = delivery.name.clone();
            if let Err(e) = self.launch(delivery) {
                tracing::error!(delivery = %name, error = %e, "delivery not started");
            }
        }
        self.shared.metrics.deliveries_reloaded("applied");
    }

    fn launch(&mut self, delivery: Delivery) -> Result<(), WorkerError> {
        let (stop, stopped) = watch::channel(false);
        let task = worker::start(delivery.clone(), &self.shared, stopped)?;
        let name = delivery.name.clone();
        let running = Running {
            delivery,
            stop,
            task,
        };
        self.running.insert(name, running);
        Ok(())
    }

    /// What a change is seen by: the time and size of the file and of each file it names.
    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        let files = self.running.values().flat_map(|r| {
            let d = &r.delivery;
            let ca = d.ca_file.iter().map(|ca| ca.path.as_path());
            let id = d.client_identity.iter();
            ca.chain(id.flat_map(|id| [id.cert_path.as_path(), id.key_path.as_path()]))
        });
        std::iter::once(self.path.as_path())
            .chain(files)
            .map(stamp)
            .collect()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Tells each to stop, then waits for all: they finish their events in hand side by side.
async fn stop_all(running: impl Iterator<Item = (String, Running)>) {
    let tasks: Vec<(String, JoinHandle<()>)> = running
        .map(|(name, r)| {
            let _ = r.stop.send(true);
            (name, r.task)
        })
        .collect();
    for (name, task) in tasks {
        if let Err(e) = task.await {
            tracing::error!(delivery = %name, error = %e, "delivery task failed");
        }
    }
}
