//! Store pruning: `ublk-target apply` deletes each segment from the store once the
//! replica's position after it is durable, the recovery points staying in the undo
//! journals; a later start deletes what an earlier run left behind, but only segments
//! of the replica's own protection; `--keep-applied-segments` leaves them all; and no
//! segment goes before the position past it is saved.

use changelog::{ChainCursor, LocalDirStore, TargetStore};
use e2e::*;
use std::process::Output;
use std::sync::{Arc, Mutex};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn apply(fixture: &Fixture, replica: &str, extra: &[&str]) -> Output {
    sparse_file(&fixture.path(replica), fixture.size);
    let out = apply_command(fixture, replica)
        .args(extra)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    out
}

fn points(fixture: &Fixture, replica: &str) -> usize {
    ublk_target::catalog(&fixture.replica_paths(replica))
        .unwrap()
        .points
        .len()
}

#[test]
fn apply_deletes_applied_segments_and_keeps_every_point() {
    let (fixture, model) = Fixture::shipped(4 << 20, 31, 60);
    let shipped = fixture.store_segments();
    assert!(shipped.len() > 3, "only {} segments", shipped.len());
    // What a run killed between its position and its deletes leaves behind, kept aside.
    let kept: Vec<(std::path::PathBuf, Vec<u8>)> = shipped[..3]
        .iter()
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .collect();

    apply(&fixture, "replica", &[]);
    assert_eq!(
        std::fs::read(fixture.path("replica")).unwrap(),
        model.final_image()
    );
    assert!(
        fixture.store_segments().is_empty(),
        "applied segments stayed"
    );
    // The points are in the undo journals, not the store: all still there.
    assert_eq!(points(&fixture, "replica"), shipped.len());

    // Left behind by an earlier run (or re-uploaded by a shipper restart): deleted by
    // the next start, nothing applied twice.
    for (path, bytes) in &kept {
        std::fs::write(path, bytes).unwrap();
    }
    // Another protection's segment of the same volume id, below the position: not
    // ours to delete.
    let (other, _) = Fixture::shipped(4 << 20, 32, 20);
    let foreign = fixture.store().segment_path(&fixture.volume, 1);
    std::fs::remove_file(&foreign).unwrap();
    std::fs::copy(&other.store_segments()[1], &foreign).unwrap();
    let out = apply_command(&fixture, "replica")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("deleted 2 applied segment(s) an earlier run left"),
        "{}",
        text(&out)
    );
    assert_eq!(
        fixture.store().list(&fixture.volume).unwrap(),
        vec![1],
        "the other protection's segment must stay"
    );
    assert_eq!(
        std::fs::read(fixture.path("replica")).unwrap(),
        model.final_image()
    );
}

#[test]
fn keep_applied_segments_leaves_the_store_for_a_second_replica() {
    let (fixture, model) = Fixture::shipped(4 << 20, 33, 40);
    let shipped = fixture.store_segments().len();
    apply(&fixture, "first", &["--keep-applied-segments"]);
    assert_eq!(fixture.store_segments().len(), shipped);
    // A second replica of the same store gets everything, and prunes.
    apply(&fixture, "second", &[]);
    assert!(fixture.store_segments().is_empty());
    for replica in ["first", "second"] {
        assert_eq!(
            std::fs::read(fixture.path(replica)).unwrap(),
            model.final_image(),
            "{replica}"
        );
    }
}

/// A segment leaves the store only once the position past it is saved (a crash before
/// that applies it again), and a long catch-up deletes as it goes rather than at its
/// end (a run killed in it leaves little behind).
#[test]
fn a_segment_is_deleted_only_after_the_position_past_it_is_saved() {
    let (fixture, model) = Fixture::shipped(8 << 20, 34, 800);
    let shipped = fixture.store_segments().len() as u64;
    assert!(shipped > 100, "only {shipped} segments: too few to show");
    let state = fixture.path("replica.state");
    // At each segment delete: the position saved in the replica's state file then.
    let deletes = Arc::new(Mutex::new(Vec::new()));
    let store = {
        let (state, deletes, volume) = (state.clone(), deletes.clone(), fixture.volume.clone());
        Arc::new(HookedStore::new(
            LocalDirStore::new(fixture.path("store")),
            move |call| {
                if let StoreCall::Delete(index) = call {
                    // No state file yet: nothing is applied.
                    let saved = std::fs::read(&state)
                        .map_or(ChainCursor::start(volume.clone()), |b| {
                            ublk_target::apply::decode_state(&b).unwrap()
                        });
                    deletes.lock().unwrap().push((index, saved.next_index));
                }
                Ok(())
            },
        ))
    };
    sparse_file(&fixture.path("replica"), fixture.size);
    let mut applier = ublk_target::Applier::open(
        store.clone(),
        fixture.volume.clone(),
        fixture.key.clone(),
        &fixture.path("replica"),
        &state,
        &ublk_target::ApplyOptions {
            prune_store: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(applier.apply_available().unwrap() as u64, shipped);
    let deletes = deletes.lock().unwrap().clone();
    assert_eq!(
        deletes.len() as u64,
        shipped,
        "every applied segment deleted once"
    );
    for &(index, saved) in &deletes {
        assert!(
            index < saved,
            "segment {index} deleted with the position at {saved}"
        );
    }
    assert!(
        deletes[0].1 < shipped,
        "the first delete waited for the end of the catch-up"
    );
    assert!(fixture.store_segments().is_empty());
    assert_eq!(
        std::fs::read(fixture.path("replica")).unwrap(),
        model.final_image()
    );
}
