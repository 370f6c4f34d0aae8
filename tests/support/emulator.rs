//! Object-storage emulators as real stores for the tests: azurite (Microsoft's Azure
//! Storage emulator, from npm) and moto's S3 server (from PyPI). Both are real servers
//! speaking their service's REST API, with request signing.
//!
//! `scripts/test.sh` installs them (`ensure_emulators` in scripts/lib.sh) and exports
//! `UBLK_DR_AZURITE_DIR` and `UBLK_DR_MOTO_DIR`; without those variables the tests that
//! need them say so and skip. Each test starts its own emulator on a free port. Azurite
//! keeps its data in a temporary directory, so it can be stopped and started again over
//! the same data (an outage); moto keeps its data in memory.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The emulator's well-known development account (documented by Microsoft).
const ACCOUNT: &str = "devstoreaccount1";
const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Azure,
    S3,
}

impl Service {
    /// The URL scheme of a store location on this service.
    pub fn scheme(self) -> &'static str {
        match self {
            Service::Azure => "az",
            Service::S3 => "s3",
        }
    }
}

pub struct Emulator {
    service: Service,
    install: PathBuf,
    data: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Emulator {
    /// Starts an emulator of `service`; `None` (after saying why) when it is not
    /// installed.
    pub fn start(service: Service) -> Option<Emulator> {
        let variable = match service {
            Service::Azure => "UBLK_DR_AZURITE_DIR",
            Service::S3 => "UBLK_DR_MOTO_DIR",
        };
        let Some(install) = std::env::var_os(variable) else {
            eprintln!("skipped: needs the {service:?} emulator (scripts/test.sh installs it and sets {variable})");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut emulator = Emulator {
            service,
            install: install.into(),
            data: tempfile::tempdir().unwrap(),
            port,
            child: None,
        };
        emulator.resume();
        Some(emulator)
    }

    pub fn service(&self) -> Service {
        self.service
    }

    /// The environment a store client needs to reach this emulator.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let url = format!("http://127.0.0.1:{}", self.port);
        match self.service {
            Service::Azure => vec![
                ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
                ("AZURITE_BLOB_STORAGE_URL", url),
            ],
            Service::S3 => vec![
                ("AWS_ENDPOINT", url),
                ("AWS_ALLOW_HTTP", "true".into()),
                ("AWS_ACCESS_KEY_ID", "test".into()),
                ("AWS_SECRET_ACCESS_KEY", "test".into()),
                ("AWS_REGION", "us-east-1".into()),
            ],
        }
    }

    /// Sets [`Emulator::env`] in this process, for stores opened in the test itself.
    /// Call it before any other thread of the test binary opens a store.
    pub fn export_env(&self) {
        for (name, value) in self.env() {
            std::env::set_var(name, value);
        }
    }

    /// Creates a container or bucket, with the service's own SDK (installed beside the
    /// emulator).
    pub fn create_bucket(&self, name: &str) {
        match self.service {
            Service::Azure => self.create_container(name),
            Service::S3 => self.create_s3_bucket(name),
        }
    }

    fn create_s3_bucket(&self, name: &str) {
        let script = "import sys, boto3\n\
            boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',\
              aws_access_key_id='test', aws_secret_access_key='test')\
              .create_bucket(Bucket=sys.argv[2])";
        let mut python = Command::new(self.install.join("bin/python3"));
        python.args([
            "-c",
            script,
            &format!("http://127.0.0.1:{}", self.port),
            name,
        ]);
        succeeds(python, &format!("creating bucket {name}"));
    }

    fn create_container(&self, name: &str) {
        let connection = format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};\
             BlobEndpoint=http://127.0.0.1:{}/{ACCOUNT};",
            self.port
        );
        let script = "const { BlobServiceClient } = require('@azure/storage-blob');\
            BlobServiceClient.fromConnectionString(process.argv[1])\
              .getContainerClient(process.argv[2]).createIfNotExists()\
              .catch((e) => { console.error(e.message); process.exit(1); });";
        let mut node = Command::new("node");
        node.env("NODE_PATH", self.install.join("node_modules"))
            .args(["-e", script, &connection, name]);
        succeeds(node, &format!("creating container {name}"));
    }

    /// Stops the emulator (kill -9: connections drop mid-request); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the emulator again on the same port (azurite: over the same data);
    /// returns once it listens.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the emulator runs already");
        let port = self.port.to_string();
        let mut command = match self.service {
            Service::Azure => {
                let mut c = Command::new(self.install.join("node_modules/.bin/azurite-blob"));
                c.args(["--silent", "--skipApiVersionCheck", "--disableTelemetry"])
                    .arg("--location")
                    .arg(self.data.path())
                    .args(["--blobPort", &port]);
                c
            }
            Service::S3 => {
                let mut c = Command::new(self.install.join("bin/moto_server"));
                c.args(["-H", "127.0.0.1", "-p", &port]);
                c
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the emulator");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the {:?} emulator did not listen on port {} within 60 s",
                self.service,
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `command` to its end and checks it succeeded, showing its stderr if not.
fn succeeds(mut command: Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: running {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
