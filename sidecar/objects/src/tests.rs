use std::os::unix::fs::PermissionsExt;

use super::*;

fn local() -> (tempfile::TempDir, Objects) {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = Objects::open(&Location::Local(dir.path().join("store"))).expect("open");
    (dir, objects)
}

#[test]
fn local_objects_round_trip_privately() {
    let (dir, o) = local();
    o.put("packs/ab/abcd", b"hello world").expect("put");
    assert_eq!(o.get("packs/ab/abcd").expect("get"), b"hello world");
    assert_eq!(o.get_range("packs/ab/abcd", 6..11).expect("range"), b"world");
    assert!(matches!(o.get_range("packs/ab/abcd", 6..20), Err(ObjectsError::Short { got: 5, .. })));
    let meta = o.head("packs/ab/abcd").expect("head").expect("exists");
    assert_eq!(meta.size, 11);
    assert!(o.head("packs/ab/none").expect("head").is_none());
    let root = dir.path().join("store");
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&root.join("packs/ab/abcd")), 0o600);
    assert_eq!(mode(&root.join("packs/ab")), 0o700);
    assert_eq!(mode(&root.join("packs")), 0o700);
    o.put("packs/ab/abcd", b"replaced").expect("overwrite");
    assert_eq!(o.get("packs/ab/abcd").expect("get"), b"replaced");
    o.delete("packs/ab/abcd").expect("delete");
    o.delete("packs/ab/abcd").expect("deleting what is gone is fine");
    assert!(matches!(o.get("packs/ab/abcd"), Err(ObjectsError::NotFound { .. })));
}

#[test]
fn create_only_writes_compare_what_they_find() {
    let (_dir, o) = local();
    assert_eq!(o.conditional(), Conditional::Honoured);
    assert_eq!(o.put_new("records/1", b"a").expect("create"), Created::New);
    assert_eq!(o.put_new("records/1", b"a").expect("retry"), Created::Same);
    let err = o.put_new("records/1", b"b").expect_err("other content");
    assert!(matches!(err, ObjectsError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("records/1"), "{err}");
    assert_eq!(o.get("records/1").expect("get"), b"a", "the first write stands");
}

#[test]
fn listings_filter_by_prefix_and_skip_work_files() {
    let (_dir, o) = local();
    for k in ["packs/aa/1", "packs/ab/2", "packs/ab/3", "records/1", "vms/a/1.json", "vms/ab/2.json"] {
        o.put(k, k.as_bytes()).expect("put");
    }
    let keys = |p: &str| o.list(p).expect("list").into_iter().map(|m| m.key).collect::<Vec<_>>();
    assert_eq!(keys("packs/"), ["packs/aa/1", "packs/ab/2", "packs/ab/3"]);
    assert_eq!(keys("packs/ab/"), ["packs/ab/2", "packs/ab/3"]);
    assert_eq!(keys("vms/a/"), ["vms/a/1.json"]);
    assert_eq!(keys("vms/a"), ["vms/a/1.json", "vms/ab/2.json"]);
    assert_eq!(keys("").len(), 6, "the work directory is not listed");
    assert!(keys("nothing/").is_empty());
}

#[test]
fn keys_are_checked_before_any_backend_sees_them() {
    let (_dir, o) = local();
    for k in ["../escape", "/abs", ".tmp/x", "a//b"] {
        assert!(matches!(o.put(k, b"x"), Err(ObjectsError::BadKey { .. })), "{k}");
        assert!(matches!(o.get(k), Err(ObjectsError::BadKey { .. })), "{k}");
    }
}

#[test]
fn s3_locations_come_from_the_environment_and_refuse_cleartext_off_loopback() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    };
    let ok = Location::parse(
        "s3://bucket/some/prefix/",
        env(&[
            ("CUTLINE_S3_ENDPOINT", "http://127.0.0.1:3900"),
            ("CUTLINE_S3_REGION", "garage"),
            ("AWS_ACCESS_KEY_ID", "GK1"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ]),
    )
    .expect("loopback http");
    let Location::S3(cfg) = &ok else { panic!("{ok:?}") };
    assert_eq!((cfg.bucket.as_str(), cfg.prefix.as_str(), cfg.region.as_str()), ("bucket", "some/prefix", "garage"));
    assert!(!format!("{ok:?}").contains("GK1") && !format!("{ok:?}").contains("\"s\""));
    let err = Location::parse(
        "s3://bucket",
        env(&[
            ("CUTLINE_S3_ENDPOINT", "http://10.0.0.1:3900"),
            ("AWS_ACCESS_KEY_ID", "a"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ]),
    )
    .expect_err("cleartext to another host");
    assert!(err.to_string().contains("http://10.0.0.1:3900"), "{err}");
    let err = Location::parse("s3://bucket", env(&[("CUTLINE_S3_ENDPOINT", "https://s3.example")]))
        .expect_err("no credentials");
    assert!(err.to_string().contains("credentials"), "{err}");
    assert!(Location::parse("s3://bucket", env(&[])).is_err(), "no endpoint");
    assert_eq!(
        Location::parse("/var/lib/cutline", env(&[])).expect("path"),
        Location::Local("/var/lib/cutline".into())
    );
}

#[test]
fn a_credentials_file_others_can_read_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("creds");
    std::fs::write(&file, "access_key_id = GK1\nsecret_access_key = abc\n").expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = location::read_credentials(&file).expect_err("0644");
    assert!(err.to_string().contains("readable by others"), "{err}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(location::read_credentials(&file).expect("0600"), ("GK1".into(), "abc".into()));
}
