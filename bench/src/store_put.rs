//! Target-store benchmark: what the network receiver costs an upload. In one run, on
//! the same segments, alternating rounds:
//!
//! 1. `LocalDirStore::put` into a directory (the baseline: what the receiver itself
//!    does with each upload: io_uring write, fsync, rename, directory fsync);
//! 2. `ReceiverStore::put` to a receiver on loopback (`objstore::Receiver`, as
//!    `ublk-target receive` runs it) storing into a directory on the same file system;
//! 3. the same over TLS (`tls://`, a self-signed certificate made by `openssl`).
//!
//! The first ratio is the protocol's cost (framing, two socket copies, the round trip)
//! on top of the store's own; the second what TLS adds to it (AES-GCM both ways). Both sides share this machine's cores, as a receiver shares its
//! host with the appliers. Segments are random bytes (the stores do not parse them).
//!
//! Usage: store-put [MiB, default 512] [DIR, default /var/tmp]

use changelog::{LocalDirStore, TargetStore, VolumeId};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const SEGMENT_BYTES: usize = 8 << 20;
const ROUNDS: usize = 3;

fn random_segments(total: usize) -> Vec<Vec<u8>> {
    let mut rng = blkfilter::workload::Rng::new(0x5eed);
    (0..total.div_ceil(SEGMENT_BYTES))
        .map(|_| {
            let mut segment = vec![0u8; SEGMENT_BYTES];
            for chunk in segment.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
            }
            segment
        })
        .collect()
}

/// Puts every segment; returns MB/s.
fn put_all(store: &dyn TargetStore, segments: &[Vec<u8>]) -> f64 {
    let volume = VolumeId::new("vol0").unwrap();
    let started = Instant::now();
    for (index, segment) in segments.iter().enumerate() {
        store.put(&volume, index as u64, segment).expect("put");
    }
    let bytes: usize = segments.iter().map(Vec::len).sum();
    bytes as f64 / started.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(512, |a| a.parse().expect("MiB"));
    let dir = args.next().unwrap_or_else(|| "/var/tmp".into());
    let segments = random_segments(mib << 20);

    let certs = tempfile::tempdir().expect("certificate directory");
    let (cert, key) = self_signed(certs.path());
    let server_tls =
        objstore::tls::server_config(&cert, &key, Default::default()).expect("TLS identity");
    let client_tls = objstore::tls::client_config(&cert, None).expect("TLS trust");
    // A receiver with its directory, plain and over TLS.
    let receiver = |tls| {
        let received = tempfile::tempdir_in(&dir).expect("receiver directory");
        let admission = objstore::Admission {
            token: String::new(),
            tls,
            clients: None,
        };
        let receiver =
            objstore::Receiver::bind("127.0.0.1:0", received.path(), admission).expect("bind");
        let port = receiver.local_addr().port();
        std::thread::spawn(move || receiver.serve());
        (received, port)
    };
    let (received, port) = receiver(None);
    let remote = objstore::ReceiverStore::new(&format!("127.0.0.1:{port}"), None);
    let (received_tls, port) = receiver(Some(server_tls));
    let remote_tls = objstore::ReceiverStore::new(&format!("localhost:{port}"), Some(client_tls));

    let (mut direct, mut through, mut through_tls) = (0f64, 0f64, 0f64);
    for _ in 0..ROUNDS {
        let local = tempfile::tempdir_in(&dir).expect("store directory");
        direct = direct.max(put_all(&LocalDirStore::new(local.path()), &segments));
        drop(local);
        through = through.max(put_all(&remote, &segments));
        empty(&received.path().join("vol0"));
        through_tls = through_tls.max(put_all(&remote_tls, &segments));
        empty(&received_tls.path().join("vol0"));
    }
    println!(
        "| put {mib} MiB in 8 MiB segments, store in {dir} | MB/s |\n|---|---|\n\
         | LocalDirStore::put (baseline) | {direct:.0} |\n\
         | ReceiverStore::put over loopback to a receiver's LocalDirStore | {through:.0} |\n\
         | the same over TLS (tls://) | {through_tls:.0} |\n\
         | ratio receiver / direct | {:.2} |\n\
         | ratio TLS receiver / plain receiver | {:.2} |",
        through / direct,
        through_tls / through
    );
    println!("\nBest of {ROUNDS} alternating rounds; one connection, one upload at a time.");
}

/// A self-signed certificate for localhost and its key, made by `openssl`.
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("receiver.pem"), dir.join("receiver.key"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (apt install openssl)");
    assert!(
        status.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    (cert, key)
}

fn empty(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read store") {
        std::fs::remove_file(entry.expect("entry").path()).expect("remove");
    }
}
