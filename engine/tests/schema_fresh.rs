//! The committed `pipefile.schema.json` (which Pipefiles reference for editor validation) must be
//! exactly what `pipe schema` prints: a stale schema would let editors accept what pipe rejects.
//! Regenerate with `pipe schema > pipefile.schema.json`.

#[test]
fn the_committed_schema_is_current() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pipe"))
        .arg("schema")
        .output()
        .unwrap();
    assert!(out.status.success());
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pipefile.schema.json"
    ))
    .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        committed,
        "pipefile.schema.json is stale: run `pipe schema > pipefile.schema.json`"
    );
}
