//! Change notification for selected folders: one inotify instance for the
//! whole daemon (the kernel allows few instances per user, many watches),
//! shared by every session that has the folder selected. Sessions in
//! IDLE wake on it; nothing polls.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::watch;

struct Watched {
    descriptors: Vec<WatchDescriptor>,
    sender: watch::Sender<u64>,
    users: usize,
}

#[derive(Default)]
struct Registry {
    by_folder: HashMap<PathBuf, Watched>,
    by_descriptor: HashMap<WatchDescriptor, PathBuf>,
}

/// The daemon's folder watcher.
#[derive(Clone)]
pub struct FolderWatcher {
    watches: Watches,
    registry: Arc<Mutex<Registry>>,
}

/// A session's interest in one folder; dropping it ends the watch when
/// nobody else has the folder selected.
pub struct Subscription {
    watcher: FolderWatcher,
    folder: PathBuf,
    /// Changes whenever the folder's `new/` or `cur/` changes.
    pub changed: watch::Receiver<u64>,
}

impl FolderWatcher {
    /// Start the watcher; events are read by a task on the current runtime.
    pub fn start() -> io::Result<FolderWatcher> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        let mut events = inotify.into_event_stream(vec![0u8; 16 * 1024])?;
        let registry: Arc<Mutex<Registry>> = Arc::default();
        let reg = registry.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let Ok(event) = event else {
                    continue;
                };
                let registry = reg.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(w) = registry
                    .by_descriptor
                    .get(&event.wd)
                    .and_then(|f| registry.by_folder.get(f))
                {
                    w.sender.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        });
        Ok(FolderWatcher { watches, registry })
    }

    /// Watch `folder` (its `new/` and `cur/`).
    pub fn subscribe(&self, folder: &Path) -> io::Result<Subscription> {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = registry.by_folder.get_mut(folder) {
            w.users += 1;
            return Ok(Subscription {
                watcher: self.clone(),
                folder: folder.to_path_buf(),
                changed: w.sender.subscribe(),
            });
        }
        let mask = WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::ONLYDIR;
        let mut descriptors = Vec::new();
        for sub in ["new", "cur"] {
            let wd = self.watches.clone().add(folder.join(sub), mask)?;
            registry
                .by_descriptor
                .insert(wd.clone(), folder.to_path_buf());
            descriptors.push(wd);
        }
        let (sender, changed) = watch::channel(0);
        registry.by_folder.insert(
            folder.to_path_buf(),
            Watched {
                descriptors,
                sender,
                users: 1,
            },
        );
        Ok(Subscription {
            watcher: self.clone(),
            folder: folder.to_path_buf(),
            changed,
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut registry = self
            .watcher
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(w) = registry.by_folder.get_mut(&self.folder) else {
            return;
        };
        w.users -= 1;
        if w.users > 0 {
            return;
        }
        if let Some(w) = registry.by_folder.remove(&self.folder) {
            for wd in w.descriptors {
                registry.by_descriptor.remove(&wd);
                // The folder may be gone already, which removed the watch.
                let _ = self.watcher.watches.clone().remove(wd);
            }
        }
    }
}
