//! The README's metric table lists exactly what `polybus::observe::METRICS`
//! describes (and so what the code emits: `tests/metrics.rs` checks every
//! emitted metric against `METRICS`).

use std::collections::BTreeMap;

use polybus::observe::METRICS;

/// (type, unit, attributes) per metric name, from the README's table.
fn readme_table() -> BTreeMap<String, (String, String, Vec<String>)> {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## Observability\n")
        .nth(1)
        .expect("README has an Observability section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut rows = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 5 || !cells[0].starts_with('`') {
            continue;
        }
        let unquote = |s: &str| s.trim_matches('`').to_owned();
        let attributes = cells[3].split(',').map(|a| unquote(a.trim())).collect();
        let previous = rows.insert(
            unquote(cells[0]),
            (cells[1].to_owned(), unquote(cells[2]), attributes),
        );
        assert!(previous.is_none(), "{} is listed twice", cells[0]);
    }
    rows
}

#[test]
fn readme_metric_table_matches_the_code() {
    let readme = readme_table();
    let code: BTreeMap<String, (String, String, Vec<String>)> = METRICS
        .iter()
        .map(|m| {
            (
                m.name.to_owned(),
                (
                    m.kind.as_str().to_owned(),
                    m.unit.to_owned(),
                    m.attributes.iter().map(|a| (*a).to_owned()).collect(),
                ),
            )
        })
        .collect();
    assert_eq!(readme, code);
}
