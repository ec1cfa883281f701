//! One fuzz target per input kind, chosen by `FPX_FUZZ_TARGET` (a name from
//! `fpx::parsers::TARGETS`): `FPX_FUZZ_TARGET=plan cargo hfuzz run parse`. A panic, an
//! abort, a timeout or an out-of-memory is a finding; an `Err` is a correct refusal.

fn main() {
    let target = std::env::var("FPX_FUZZ_TARGET").unwrap_or_default();
    if !fpx::parsers::TARGETS.contains(&target.as_str()) {
        eprintln!("set FPX_FUZZ_TARGET to one of {:?}", fpx::parsers::TARGETS);
        std::process::exit(2);
    }
    loop {
        honggfuzz::fuzz!(|data: &[u8]| {
            let _ = fpx::parsers::parse(&target, data);
        });
    }
}
