//! Replays every committed fuzz corpus file (`fuzz/corpus/TARGET/*`) through the parser its
//! fuzz target drives (`fpx::parsers`), without a fuzzer: seeds (`seed-*`, valid inputs
//! made by `fuzz/src/bin/make_seeds.rs`) must parse, and every other file (inputs the fuzzer
//! found, crashes it found once and that were fixed) must be refused or accepted without a
//! panic.

use std::path::Path;

#[test]
fn every_committed_corpus_file_parses_or_is_refused_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut total = 0;
    for target in fpx::parsers::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(
            files.iter().any(|f| f
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")),
            "{target}: no seed in {}",
            dir.display()
        );
        for file in &files {
            let bytes = std::fs::read(file).unwrap();
            let result = std::panic::catch_unwind(|| fpx::parsers::parse(target, &bytes));
            let name = file.file_name().unwrap().to_string_lossy();
            match result {
                Err(_) => panic!("{target}: {} panicked", file.display()),
                Ok(Err(e)) if name.starts_with("seed-") => {
                    panic!("{target}: seed {} is refused: {e}", file.display())
                }
                Ok(_) => total += 1,
            }
        }
    }
    eprintln!("{total} corpus files replayed");
}
