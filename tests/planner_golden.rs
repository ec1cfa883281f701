//! The committed example plans in plans/ are golden files: regenerating them from the
//! committed SmolLM2 calibration (docs/smollm2.calib.json) with the commands in
//! docs/planner.md must give the same bytes. A solver, latency-model or schema change that
//! alters them fails here until the plans are regenerated and reviewed:
//! `FPX_UPDATE_PLANS=1 cargo test --test planner_golden`.

mod common;

use std::process::Command;

use fpx::plan::Plan;

/// (plan file, extra arguments after `plan --calib docs/smollm2.calib.json --device h100`).
const PLANS: [(&str, &[&str]); 3] = [
    (
        "plans/smollm2-greedy-gamma0.5-h100.plan.json",
        &["--solver", "greedy", "--gamma", "0.5"],
    ),
    (
        "plans/smollm2-ilp-gamma0.5-h100.plan.json",
        &["--solver", "ilp", "--gamma", "0.5"],
    ),
    (
        "plans/smollm2-ilp-kl-gamma0.5-h100.plan.json",
        &["--solver", "ilp", "--gamma", "0.5", "--objective", "kl"],
    ),
];

#[test]
fn example_plans_regenerate_byte_for_byte() {
    let repo = common::repo();
    let calib = repo.join("docs/smollm2.calib.json");
    if !common::have("docs/smollm2.calib.json", calib.exists()) {
        return;
    }
    let update = std::env::var("FPX_UPDATE_PLANS").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir().unwrap();
    for (path, args) in PLANS {
        let out = dir.path().join("plan.json");
        let status = Command::new(env!("CARGO_BIN_EXE_fpx"))
            .current_dir(&repo)
            .args([
                "plan",
                "--calib",
                "docs/smollm2.calib.json",
                "--device",
                "h100",
            ])
            .args(args)
            .arg("-o")
            .arg(if update { repo.join(path) } else { out.clone() })
            .output()
            .expect("fpx runs");
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        if update {
            continue;
        }
        let want = std::fs::read(repo.join(path)).unwrap_or_default();
        let got = std::fs::read(&out).unwrap();
        assert!(
            want == got,
            "{path} differs from a fresh `fpx plan` (regenerate: FPX_UPDATE_PLANS=1 cargo test \
             --test planner_golden, then review the diff)"
        );
        // And they stay readable by `fpx eval --plan`.
        let plan = Plan::read(&repo.join(path)).unwrap();
        assert_eq!(
            plan.precision_map().len(),
            211,
            "210 block layers + lm_head"
        );
    }
}
