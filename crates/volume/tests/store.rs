//! The volume store over a real SQLite store and a real object directory: commits, forks, reads, diffs and
//! garbage collection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use compute_store::{Environment, Store};
use compute_volume::{
    Changes, CommitRequest, Extent, FileContent, FileData, Metadata, NodeSpec, ObjectKey, Objects, Remove, Selector,
    Upsert, VolumeConfig, VolumeSel, VolumeStore, WriteMode,
};

const ENV: &str = "env-test";

fn open(dir: &std::path::Path) -> Arc<VolumeStore> {
    let store = Arc::new(Store::open(dir.join("state.db")).unwrap());
    store.write(|r| r.environments().insert(&Environment { id: ENV.into(), name: "test".into(), created_at: 0 })).ok();
    let objects = Objects::local(&dir.join("objects")).unwrap();
    Arc::new(VolumeStore::open(store, objects, VolumeConfig::default()).unwrap())
}

fn sel(name: &str) -> VolumeSel {
    VolumeSel { id: String::new(), name: name.into() }
}

async fn object(v: &VolumeStore, data: &[u8]) -> ObjectKey {
    let key = ObjectKey::of(data);
    v.objects().put_verified(ENV, &key, Bytes::copy_from_slice(data)).await.unwrap();
    key
}

fn located(key: &ObjectKey, size: u64) -> FileContent {
    FileContent::Located {
        hash: key.hash().into(),
        size,
        extents: vec![Extent { object: key.hash().into(), offset: 0, size, hash: String::new() }],
        chunked: false,
    }
}

fn upsert(path: &str, content: FileContent) -> Upsert {
    Upsert { path: path.into(), node: NodeSpec::File(content), meta: Metadata::default(), mode: WriteMode::Upsert }
}

async fn commit(v: &VolumeStore, vol: &str, id: &str, changes: Changes) -> u64 {
    let req = CommitRequest { volume: sel(vol), commit_id: id.into(), changes, ..Default::default() };
    v.commit(ENV, req).await.unwrap().version.version_id
}

#[tokio::test]
async fn commits_forks_reads_and_diffs() {
    let dir = tempfile::tempdir().unwrap();
    let v = open(dir.path());
    v.create(ENV, "data", "data").unwrap();
    let big = vec![7u8; 100_000];
    let key = object(&v, &big).await;
    let v1 = commit(
        &v,
        "data",
        "c1",
        Changes { upserts: vec![upsert("a/big.bin", located(&key, 100_000))], ..Default::default() },
    )
    .await;
    let v2 = commit(
        &v,
        "data",
        "c2",
        Changes {
            upserts: vec![upsert("a/small.txt", FileContent::Inline { data: b"hi".to_vec() })],
            ..Default::default()
        },
    )
    .await;
    assert_eq!((v1, v2), (1, 2));
    // The same commit id again returns the first outcome and makes no version.
    assert_eq!(commit(&v, "data", "c1", Changes::default()).await, 1);

    let f = v.get_file(ENV, &sel("data"), &Selector::default(), "a/big.bin", "http://h").await.unwrap();
    assert!(matches!(&f.data, FileData::Packed(p) if p.url.starts_with("http://h/v2/blobs/") && p.size == 100_000));
    let part = v.read_range(ENV, &f.entry, 99_990, 100).await.unwrap();
    assert_eq!(part.len(), 10);

    let r = v.create_ref(ENV, &sel("data"), "fork", v1).await.unwrap();
    assert_eq!(r.version_id, v1);
    let req = CommitRequest {
        volume: sel("data"),
        commit_id: "c3".into(),
        ref_name: Some("fork".into()),
        changes: Changes { removes: vec![Remove { path: "a".into(), recursive: true }], ..Default::default() },
        ..Default::default()
    };
    let v3 = v.commit(ENV, req).await.unwrap().version;
    let main = v.view(ENV, &sel("data"), &Selector::default()).unwrap().version.unwrap();
    assert_eq!(main.version_id, v2, "a commit on the fork leaves main alone");
    let d = v.diff(Some(&main), &v3).unwrap();
    assert_eq!(d.removed, vec!["a/big.bin".to_string(), "a/small.txt".to_string()]);
    assert!(d.added.is_empty() && d.modified.is_empty());

    // A new volume forked from a version shares its tree: same listing, nothing copied.
    let (_, forked) = v.fork_volume(ENV, &sel("data"), &Selector::Version(v2), "copy").await.unwrap();
    assert_eq!(forked.root_tree, main.root_tree);
    let (_, files, _) = v.list_files(ENV, &sel("copy"), &Selector::default(), "", true, "", 100).unwrap();
    let paths: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["a", "a/big.bin", "a/small.txt"]);
}

#[tokio::test]
async fn gc_deletes_only_what_no_version_references() {
    let dir = tempfile::tempdir().unwrap();
    let v = open(dir.path());
    v.create(ENV, "keep", "data").unwrap();
    v.create(ENV, "drop", "data").unwrap();
    let kept = object(&v, &[1u8; 5000]).await;
    let dropped = object(&v, &[2u8; 5000]).await;
    let stray = object(&v, &[3u8; 5000]).await; // uploaded, never committed
    commit(&v, "keep", "k", Changes { upserts: vec![upsert("f", located(&kept, 5000))], ..Default::default() }).await;
    commit(&v, "drop", "d", Changes { upserts: vec![upsert("g", located(&dropped, 5000))], ..Default::default() })
        .await;

    // Within the grace period nothing goes, not even the stray upload whose commit may still come.
    let report = v.gc(Some(Duration::from_secs(3600))).await.unwrap();
    assert_eq!(report.objects_deleted, 0);
    assert!(v.has_object(ENV, &stray).await.unwrap());

    v.delete(ENV, &sel("drop")).await.unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let report = v.gc(Some(Duration::ZERO)).await.unwrap();
    assert_eq!(report.objects_deleted, 2, "{report:?}");
    assert!(v.has_object(ENV, &kept).await.unwrap());
    assert!(!v.has_object(ENV, &dropped).await.unwrap());
    assert!(!v.has_object(ENV, &stray).await.unwrap());
    // Every committed version of the kept volume still reads.
    let f = v.get_file(ENV, &sel("keep"), &Selector::default(), "f", "http://h").await.unwrap();
    assert!(matches!(f.data, FileData::Bytes(b) if b.as_ref() == [1u8; 5000]));
    assert!(report.trees_deleted >= 1, "the dropped volume's trees went too: {report:?}");
}

#[tokio::test]
async fn retention_and_gc_keep_a_version_a_mount_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("state.db")).unwrap());
    store.write(|r| r.environments().insert(&Environment { id: ENV.into(), name: "test".into(), created_at: 0 })).ok();
    let objects = Objects::local(&dir.path().join("objects")).unwrap();
    let config = VolumeConfig { retention: Some(Duration::ZERO), ..VolumeConfig::default() };
    let v = Arc::new(VolumeStore::open(store, objects, config).unwrap());
    v.create(ENV, "data", "data").unwrap();
    let old = object(&v, &[4u8; 5000]).await;
    let new = object(&v, &[5u8; 5000]).await;
    let v1 = commit(&v, "data", "a", Changes { upserts: vec![upsert("f", located(&old, 5000))], ..Default::default() })
        .await;
    let hold = v.hold_version(ENV, &sel("data"), v1).unwrap();
    commit(&v, "data", "b", Changes { upserts: vec![upsert("f", located(&new, 5000))], ..Default::default() }).await;
    std::thread::sleep(Duration::from_millis(1100));

    // v1 is past retention and no ref points at it, but a mount reads from it.
    let report = v.gc(Some(Duration::ZERO)).await.unwrap();
    assert_eq!(report.versions_pruned, 0, "{report:?}");
    assert!(v.has_object(ENV, &old).await.unwrap());
    let f = v.get_file(ENV, &sel("data"), &Selector::Version(v1), "f", "http://h").await.unwrap();
    assert!(matches!(f.data, FileData::Bytes(b) if b.as_ref() == [4u8; 5000]));

    drop(hold);
    let report = v.gc(Some(Duration::ZERO)).await.unwrap();
    assert_eq!(report.versions_pruned, 1, "{report:?}");
    assert!(!v.has_object(ENV, &old).await.unwrap());
    assert!(v.has_object(ENV, &new).await.unwrap());
}

fn inline(data: &[u8]) -> FileContent {
    FileContent::Inline { data: data.to_vec() }
}

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// #12 items 3 and 4: one-file commits into a 10,000-file directory store a leaf and its index path each (not the
/// directory), the server's memory stays flat over 10,000 of them, every file reads back, and garbage collection
/// under retention takes the superseded pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_one_file_commits_keep_storage_linear_and_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("state.db")).unwrap());
    store.write(|r| r.environments().insert(&Environment { id: ENV.into(), name: "test".into(), created_at: 0 })).ok();
    let objects = Objects::local(&dir.path().join("objects")).unwrap();
    // A small tree cache, so that it is full long before the end and what is measured is growth beyond it.
    let config = VolumeConfig { retention: Some(Duration::ZERO), tree_cache_bytes: 8 << 20, ..VolumeConfig::default() };
    let v = Arc::new(VolumeStore::open(store, objects, config).unwrap());
    v.create(ENV, "many", "data").unwrap();
    let seed = (0..10_000).map(|i| upsert(&format!("d/f{i:05}"), inline(b"s"))).collect();
    commit(&v, "many", "seed", Changes { upserts: seed, ..Default::default() }).await;
    let (_, seeded) = v.tree_totals().unwrap();

    let mut rss_at_2000 = 0;
    for i in 0..10_000 {
        let one = Changes { upserts: vec![upsert(&format!("d/n{i:05}"), inline(b"x"))], ..Default::default() };
        commit(&v, "many", &format!("c{i}"), one).await;
        if i % 500 == 0 {
            // Readers see the whole directory each time (joined from its pieces), as a mount's listing would.
            let root = v.view(ENV, &sel("many"), &Selector::default()).unwrap().version.unwrap().root_tree;
            let d = v.lookup(&root, "d").unwrap().unwrap();
            assert_eq!(v.load_tree(&d.hash).unwrap().entries.len(), 10_001 + i);
        }
        if i == 2_000 {
            rss_at_2000 = rss();
        }
    }
    let grown = rss().saturating_sub(rss_at_2000);
    assert!(grown < 16 << 20, "memory grew by {grown} bytes over 8,000 commits");
    let (_, after) = v.tree_totals().unwrap();
    let per_commit = (after - seeded) / 10_000;
    eprintln!("seeded {seeded} B of trees; {per_commit} B per one-file commit; memory +{grown} B over 8,000 commits");
    // The flat directory was ~1 MB: every commit stored all of it before #12.
    assert!(per_commit < 40 * 1024, "each commit stored {per_commit} bytes of trees");

    let f = v.get_file(ENV, &sel("many"), &Selector::default(), "d/n09999", "http://h").await.unwrap();
    assert!(matches!(f.data, FileData::Bytes(b) if b.as_ref() == b"x"));
    let f = v.get_file(ENV, &sel("many"), &Selector::default(), "d/f04321", "http://h").await.unwrap();
    assert!(matches!(f.data, FileData::Bytes(b) if b.as_ref() == b"s"));

    std::thread::sleep(Duration::from_millis(1100));
    let report = v.gc(Some(Duration::ZERO)).await.unwrap();
    assert_eq!(report.versions_pruned, 10_000, "{report:?}");
    let (_, collected) = v.tree_totals().unwrap();
    assert!(collected < seeded * 3, "after collection {collected} bytes of trees remain (one version: ~{seeded})");
    let root = v.view(ENV, &sel("many"), &Selector::default()).unwrap().version.unwrap().root_tree;
    let d = v.lookup(&root, "d").unwrap().unwrap();
    assert_eq!(v.load_tree(&d.hash).unwrap().entries.len(), 20_000);
}
