//! The command lines: help that reads well, and clear errors with a non-zero exit for
//! bad input, before anything is created.

use e2e::bin;
use std::process::Command;

fn run(name: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin(name)).args(args).output().expect("run");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn every_command_has_help() {
    for (name, subs) in [
        (
            "blkfilter",
            &["attach", "recover", "detach", "list", "exercise"][..],
        ),
        ("shipper", &["keygen", "run", "status"][..]),
        ("ublk-target", &["apply", "inspect"][..]),
    ] {
        let (ok, text) = run(name, &["--help"]);
        assert!(ok, "{name} --help failed");
        for sub in subs {
            assert!(text.contains(sub), "{name} --help does not list {sub}");
            let (ok, sub_help) = run(name, &[sub, "--help"]);
            assert!(
                ok && sub_help.contains("Usage:"),
                "{name} {sub} --help: {sub_help}"
            );
        }
    }
}

#[test]
fn attach_without_ublk_in_the_kernel_says_so() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("this kernel has ublk; the VM tests cover attach here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let ring = dir.path().join("ring");
    let (ok, text) = run(
        "blkfilter",
        &[
            "attach",
            "--foreground",
            "--backing",
            backing.to_str().unwrap(),
            "--ring",
            ring.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(
        text.contains("/dev/ublk-control is missing") && text.contains("scripts/vm.sh"),
        "{text}"
    );
}

#[test]
fn attach_with_a_missing_backing_names_it() {
    let (ok, text) = run(
        "blkfilter",
        &[
            "attach",
            "--foreground",
            "--backing",
            "/nonexistent/disk",
            "--ring",
            "/tmp/r",
        ],
    );
    assert!(!ok);
    assert!(
        text.contains("/nonexistent/disk") && text.contains("No such file"),
        "{text}"
    );
}

#[test]
fn shipper_refuses_bad_key_and_missing_ring() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"short").unwrap();
    let d = dir.path().to_str().unwrap();
    let args = [
        "run",
        "--volume",
        "v",
        "--ring",
        "/nonexistent/ring",
        "--staging",
        d,
        "--store",
        d,
        "--key",
    ];
    let (ok, text) = run("shipper", &[&args[..], &[key.to_str().unwrap()]].concat());
    assert!(!ok && text.contains("5 bytes"), "{text}");
    let (ok, _) = run(
        "shipper",
        &["keygen", "--out", dir.path().join("k2").to_str().unwrap()],
    );
    assert!(ok);
    let (ok, text) = run(
        "shipper",
        &[&args[..], &[dir.path().join("k2").to_str().unwrap()]].concat(),
    );
    assert!(!ok && text.contains("/nonexistent/ring"), "{text}");
    let (ok, text) = run(
        "shipper",
        &[
            "run",
            "--volume",
            "../x",
            "--ring",
            "r",
            "--staging",
            d,
            "--store",
            d,
            "--key",
            "k",
        ],
    );
    assert!(!ok && text.contains("invalid volume id"), "{text}");
}
