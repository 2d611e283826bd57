//! The README's memory table states the sizes of these types; this test
//! keeps the two in step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use negcache::storage::{Bf16Store, Int8Store};
use negcache::tower::{SeparateTowers, TowerConfig};
use negcache::trainer::Trainer;
use negcache::{CacheLoss, NegativeCache};

type Big = Trainer<SeparateTowers<32768, 64, 128, 64, 2>, [u32; 32], [u32; 12], 64, 32, 1>;

fn readme_bytes(row_start: &str) -> usize {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let row = readme.lines().find(|l| l.starts_with(row_start)).unwrap_or_else(|| panic!("no row {row_start}"));
    let cell = row.trim_end_matches('|').rsplit('|').next().unwrap().trim();
    cell.replace(',', "").parse().unwrap_or_else(|_| panic!("not a number of bytes: {cell}"))
}

#[test]
fn the_readme_states_the_sizes_of_the_core_types() {
    let _ = TowerConfig::DEFAULT;
    let sizes = [
        ("| `NegativeCache<u32, 65536, 64>`", size_of::<NegativeCache<u32, 65536, 64>>()),
        (
            "| `NegativeCache<u32, 65536, 64, Bf16Store",
            size_of::<NegativeCache<u32, 65536, 64, Bf16Store<65536, 64>>>(),
        ),
        (
            "| `NegativeCache<u32, 65536, 64, Int8Store",
            size_of::<NegativeCache<u32, 65536, 64, Int8Store<65536, 64>>>(),
        ),
        ("| `CacheLoss<32, 1>`", size_of::<CacheLoss<32, 1>>()),
        ("| a large trainer", size_of::<Big>()),
    ];
    for (row, size) in sizes {
        assert_eq!(readme_bytes(row), size, "README row {row}");
    }
}
