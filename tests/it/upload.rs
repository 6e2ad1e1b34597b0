//! The upload stage against real S3 servers: parts larger than half the part pool are staged as
//! objects of smaller parts and copied in (UploadPartCopy), so memory stays within the pool up
//! to S3's largest object. Driven through the library's `ObjectWriter` with a pool far smaller
//! than its parts, so that a few tens of MiB exercise what a 5 TiB stream does after its first
//! 100 GiB.

use std::io::Write;

use lifeboat::upload::{Destination, ObjectWriter, Parts};
use tokio_util::sync::CancellationToken;

use crate::support::{Server, moto, noise, rt, s3s_fs};

const MIB: usize = 1 << 20;

/// Parts of 16 MiB with a 12 MiB pool: every part is staged, in pieces of 6 MiB.
fn writer(server: &Server, bucket: &str, key: &str) -> ObjectWriter {
    let config = lifeboat::config::Config::parse(
        std::path::Path::new("test.toml"),
        &format!("[s3]\nbucket = \"{bucket}\"\n"),
    )
    .unwrap();
    ObjectWriter::new(
        server.client(),
        Destination::new(&config.s3, key.to_owned(), "application/gzip"),
        Parts {
            size: 16 * MIB as u64,
            in_flight: 2,
            memory: 12 * MIB as u64,
        },
        std::time::Duration::from_secs(60),
        rt().handle().clone(),
        CancellationToken::new(),
    )
}

/// Every object version in `bucket` (moto; with versioning on, a deleted staged object would
/// leave its bytes as a noncurrent version).
fn versions(server: &Server, bucket: &str) -> Vec<String> {
    let out = rt()
        .block_on(server.client().list_object_versions().bucket(bucket).send())
        .unwrap();
    out.versions()
        .iter()
        .filter_map(|v| v.key().map(str::to_owned))
        .chain(
            out.delete_markers()
                .iter()
                .filter_map(|m| m.key().map(|k| format!("{k} (delete marker)"))),
        )
        .collect()
}

fn versioned(server: &Server, bucket: &str) {
    use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
    rt().block_on(
        server
            .client()
            .put_bucket_versioning()
            .bucket(bucket)
            .versioning_configuration(
                VersioningConfiguration::builder()
                    .status(BucketVersioningStatus::Enabled)
                    .build(),
            )
            .send(),
    )
    .unwrap();
}

fn staged_parts_round_trip(server: &Server, versioning: bool) {
    let bucket = server.bucket("staged-parts");
    if versioning {
        versioned(server, &bucket);
    }
    let key = "lb/web/i-0abc/20261127T220000Z-big.tar.gz";
    // Two whole staged parts and a last one cut short in its second piece.
    let data = noise(40 * MIB + 123, 11);
    let mut w = writer(server, &bucket, key);
    let input = data.clone();
    let w = std::thread::spawn(move || {
        for chunk in input.chunks(256 * 1024) {
            w.write_all(chunk).unwrap();
        }
        w
    })
    .join()
    .unwrap();
    let stored = rt().block_on(w.finish()).unwrap();
    assert_eq!(stored.parts, 3, "{stored:?}");
    assert_eq!(stored.size, data.len() as u64);
    assert!(stored.etag.trim_matches('"').ends_with("-3"), "{stored:?}");
    assert!(
        server.get(&bucket, key) == data,
        "the object differs from the stream"
    );
    // Nothing staged is left: no object, no upload, no noncurrent version.
    assert_eq!(server.keys(&bucket), vec![key.to_owned()]);
    if versioning {
        assert_eq!(versions(server, &bucket), vec![key.to_owned()]);
    }
    if server.control.is_some() {
        assert_eq!(server.open_uploads(&bucket), 0);
    }
}

#[test]
fn staged_parts_are_copied_in_and_leave_nothing_behind_on_s3s_fs() {
    staged_parts_round_trip(s3s_fs(), false);
}

#[test]
fn staged_parts_are_copied_in_and_leave_nothing_behind_on_moto_with_versioning() {
    staged_parts_round_trip(moto(), true);
}

/// A backup that fails while parts are staged (here: the pipeline stops after a staged part
/// was sealed and the next one started) leaves no staged upload or object behind.
#[test]
fn an_abort_while_parts_are_staged_removes_them() {
    let server = moto();
    let bucket = server.bucket("staged-abort");
    versioned(server, &bucket);
    let key = "lb/web/i-0abc/20261127T220000Z-aborted.tar.gz";
    let mut w = writer(server, &bucket, key);
    let aborter = w.abort_handle();
    let data = noise(22 * MIB, 12);
    let w = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w
    })
    .join()
    .unwrap();
    // The first part's staged upload exists (its pieces went out as they filled).
    crate::support::eventually(
        "a staged upload",
        std::time::Duration::from_secs(30),
        || (server.open_uploads(&bucket) >= 2).then_some(()),
    );
    drop(w);
    assert!(rt().block_on(aborter.abort()).is_none());
    assert_eq!(server.open_uploads(&bucket), 0, "an upload was left open");
    let left: Vec<String> = versions(server, &bucket)
        .into_iter()
        .filter(|k| !k.ends_with("(delete marker)"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
