//! Azurite, Microsoft's Azure Storage emulator, as a real object store for the tests.
//!
//! `scripts/test.sh` installs it with npm (`ensure_azurite` in scripts/lib.sh) and
//! exports `UBLK_DR_AZURITE_DIR`; without that variable the tests that need it say so
//! and skip. Each test binary starts its own emulator on a free port, with its data in
//! a temporary directory, so it can be stopped and started again over the same data
//! (an outage) without touching another binary's.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The emulator's well-known development account (documented by Microsoft).
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    install: PathBuf,
    data: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Azurite {
    /// Starts an emulator; `None` (after saying why) when azurite is not installed.
    pub fn start() -> Option<Azurite> {
        let Some(install) = std::env::var_os("UBLK_DR_AZURITE_DIR") else {
            eprintln!(
                "skipped: needs azurite (scripts/test.sh installs it and sets UBLK_DR_AZURITE_DIR)"
            );
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut azurite = Azurite {
            install: install.into(),
            data: tempfile::tempdir().unwrap(),
            port,
            child: None,
        };
        azurite.resume();
        Some(azurite)
    }

    /// The environment a store client needs to reach this emulator.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            (
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
        ]
    }

    /// Sets [`Azurite::env`] in this process, for stores opened in the test itself.
    /// Call it before any other thread of the test binary opens a store.
    pub fn export_env(&self) {
        for (name, value) in self.env() {
            std::env::set_var(name, value);
        }
    }

    /// Creates a container (with the Azure SDK for JavaScript installed beside azurite).
    pub fn create_container(&self, name: &str) {
        let connection = format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};\
             BlobEndpoint=http://127.0.0.1:{}/{ACCOUNT};",
            self.port
        );
        let script = "const { BlobServiceClient } = require('@azure/storage-blob');\
            BlobServiceClient.fromConnectionString(process.argv[1])\
              .getContainerClient(process.argv[2]).createIfNotExists()\
              .catch((e) => { console.error(e.message); process.exit(1); });";
        let out = Command::new("node")
            .env("NODE_PATH", self.install.join("node_modules"))
            .args(["-e", script, &connection, name])
            .output()
            .expect("run node");
        assert!(
            out.status.success(),
            "creating container {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the emulator (kill -9: connections drop mid-request); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the emulator again over the same data and port; returns once it listens.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "azurite runs already");
        let child = Command::new(self.install.join("node_modules/.bin/azurite-blob"))
            .args(["--silent", "--skipApiVersionCheck", "--disableTelemetry"])
            .arg("--location")
            .arg(self.data.path())
            .args(["--blobPort", &self.port.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("start azurite-blob");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "azurite did not listen on port {} within 60 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}
