//! A folder of config files that the folder source reads into a model: the
//! fixture of the model tests and the ReferenceGrant tests.

use std::path::Path;

use istiod_lite::config::folder::FolderSource;
use istiod_lite::model::{Delta, Model, ModelConfig};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub src: FolderSource,
    pub model: Model,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = FolderSource::new(dir.path());
        Fixture {
            dir,
            src,
            model: Model::new(ModelConfig::default()),
        }
    }

    /// Writes a file, its change seen even within one mtime tick.
    pub fn write(&self, name: &str, text: &str) {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        bump_mtime(&p);
    }

    /// One scan of the folder, applied to the model.
    pub fn sync(&mut self) -> Delta {
        let changes = self.src.scan();
        self.model.apply(changes)
    }

    /// The folder's issues and the model's, as text.
    pub fn issues(&self) -> Vec<String> {
        let mut v: Vec<String> = self.src.issues().iter().map(|i| i.to_string()).collect();
        v.extend(
            self.model
                .issues()
                .iter()
                .map(|i| format!("{}: {}", i.object, i.reason)),
        );
        v
    }
}

/// Sets a file's mtime a fresh second ahead, so every write is a change.
fn bump_mtime(p: &Path) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let t = std::time::SystemTime::now()
        + std::time::Duration::from_secs(N.fetch_add(1, Ordering::Relaxed));
    let f = std::fs::File::options().write(true).open(p).expect("open");
    f.set_modified(t).expect("set mtime");
}
