//! Statistical disclosure control on the loaded data, before any answer leaves the node:
//!
//! - [`check_cells`]: the cell rules. Every level of every factor in the design, every cell of
//!   every factor × factor interaction in it, and the rows outside each, hold either no row or
//!   at least `min_cell` rows; so do both classes of a binary target (at least `min_cell`,
//!   never empty) and both splits. Otherwise an exact sum over a small group (a one-row class
//!   turns a gradient into a record) would be released. Counted from the factors' raw level
//!   codes ([`fedstat_core::data::FactorCodes`]), not from dummy columns, so any coding and
//!   any interaction is covered.
//! - [`released_sets`] and [`ReleaseLedger`]: differencing protection. Every answer is a sum
//!   over some set of rows: the split, a target class, a level. Two experiments whose sets
//!   differ by a few rows release, by subtraction, the sum over those few rows. The ledger keeps
//!   every set this node has released, per dataset, durably, and refuses a new experiment with
//!   a set that differs from a recorded one by between 1 and `min_cell - 1` rows. The rows
//!   with positive weight are such a set, so weights that drop a few rows are refused too.
//!
//! Rows are recognised by fingerprints ([`fedstat_core::data::Design::ids`]), so the rule also
//! holds across edits of the file: adding or removing a few people between two experiments is
//! refused like two thresholds a few rows apart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedstat_core::data::{FactorCodes, FactorColumn, LocalData, RowId};
use fedstat_core::files::{atomic_write, Access};
use fedstat_core::text::printable;
use fedstat_proto::design::DesignPlan;
use fedstat_proto::manifest::hex;
use sha2::{Digest, Sha256};

use crate::policy::{Refusal, Split};
use crate::{Error, Result};

/// Whether `count` rows out of `total` may be released as a group: none, or at least `min`
/// inside and (when anything is outside) at least `min` outside.
fn cell_ok(count: u64, total: u64, min: u64) -> bool {
    let rest = total - count.min(total);
    (count == 0 || count >= min) && (rest == 0 || rest >= min)
}

/// The cells of one factor set (one declared factor, or the factors of an interaction) in
/// one split: the row indices of every combination of levels that occurs, keyed by the codes.
/// Combinations that do not occur hold no row, which the rules allow.
fn cells(
    columns: &[String],
    codes: &BTreeMap<String, FactorColumn>,
    rows: usize,
) -> BTreeMap<Vec<u32>, Vec<usize>> {
    let mut out: BTreeMap<Vec<u32>, Vec<usize>> = BTreeMap::new();
    let cols: Vec<&FactorColumn> = columns.iter().filter_map(|c| codes.get(c)).collect();
    if cols.len() != columns.len() {
        return out;
    }
    for i in 0..rows {
        let key: Vec<u32> = cols
            .iter()
            .map(|c| c.codes.get(i).copied().unwrap_or(u32::MAX))
            .collect();
        out.entry(key).or_default().push(i);
    }
    out
}

/// The cell rules, on the raw (unstandardised) data and the factors' level codes: both
/// splits hold at least `min_cell` rows; both classes of a 0/1 response at least `min_cell`
/// (never empty); every level of every factor in the design, and every cell of every factor ×
/// factor interaction in it, holds 0 or at least `min_cell` rows, and so do the rows outside
/// it; an offset is finite. The refusal names the rule, the column(s) and the split; never a
/// count or a value.
pub fn check_cells(
    plan: &DesignPlan,
    data: &LocalData,
    codes: &FactorCodes,
    min_cell: u64,
) -> Result<(), Refusal> {
    let sets = plan.factor_sets();
    for (split, d, codes) in [
        (Split::Train, &data.train, &codes.train),
        (Split::Test, &data.test, &codes.test),
    ] {
        let rows = d.rows() as u64;
        if rows < min_cell {
            return Err(Refusal::SmallSplit { split });
        }
        if plan.response.is_binary() {
            let positives = d.y.iter().filter(|v| **v > 0.5).count() as u64;
            if positives < min_cell || rows - positives < min_cell {
                return Err(Refusal::SmallClass {
                    column: plan.response.column().to_owned(),
                    split,
                });
            }
        }
        for columns in &sets {
            let small = cells(columns, codes, d.rows())
                .values()
                .any(|ids| !cell_ok(ids.len() as u64, rows, min_cell));
            if small {
                return Err(match columns.as_slice() {
                    [one] => Refusal::SmallLevel {
                        column: one.clone(),
                        split,
                    },
                    _ => Refusal::SmallCell {
                        columns: columns.join(":"),
                        split,
                    },
                });
            }
        }
        if let (Some(o), Some(offset)) = (&plan.offset, &d.offset) {
            if offset.iter().any(|v| !v.is_finite()) {
                return Err(Refusal::BadOffset {
                    column: o.column.clone(),
                });
            }
        }
    }
    Ok(())
}

/// A set of rows whose sums an experiment releases, with a label for refusals and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSet {
    /// E.g. "training rows of target class 1"; names columns, never values.
    pub label: String,
    /// Sorted, distinct fingerprints.
    pub ids: Vec<RowId>,
}

impl RowSet {
    fn new(label: String, ids: impl IntoIterator<Item = RowId>) -> Self {
        let ids: BTreeSet<RowId> = ids.into_iter().collect();
        RowSet {
            label,
            ids: ids.into_iter().collect(),
        }
    }

    /// SHA-256 of the fingerprints: the set's name in the ledger.
    fn digest(&self) -> String {
        let mut h = Sha256::new();
        for id in &self.ids {
            h.update(id.to_le_bytes());
        }
        hex(&h.finalize())
    }
}

/// Every row set the experiment's answers are sums over: each split; within it, each class of
/// a 0/1 response, each level of each factor and each cell of each factor × factor interaction
/// in the design (a coefficient's gradient and its `XᵀWX` entries are sums over that cell),
/// and the rows with positive weight, each with the rest of the split beside it, since a sum
/// over a set and over the whole split give the sum over its complement. So two experiments
/// whose weights differ on a few rows are two sets a few rows apart. Empty sets are left out.
pub fn released_sets(plan: &DesignPlan, data: &LocalData, codes: &FactorCodes) -> Vec<RowSet> {
    let mut sets = Vec::new();
    let factor_sets = plan.factor_sets();
    for (split, d, codes) in [
        (Split::Train, &data.train, &codes.train),
        (Split::Test, &data.test, &codes.test),
    ] {
        sets.push(RowSet::new(format!("{split} rows"), d.ids.iter().copied()));
        let mut split_by = |label: String, inside: &dyn Fn(usize) -> bool| {
            let (mut yes, mut no) = (Vec::new(), Vec::new());
            for (i, id) in d.ids.iter().enumerate() {
                if inside(i) {
                    yes.push(*id);
                } else {
                    no.push(*id);
                }
            }
            for (part, ids) in [("in", yes), ("outside", no)] {
                if !ids.is_empty() {
                    sets.push(RowSet::new(format!("{split} rows {part} {label}"), ids));
                }
            }
        };
        if plan.response.is_binary() {
            let column = printable(plan.response.column()).into_owned();
            split_by(format!("the positive class of target `{column}`"), &|i| {
                d.y[i] > 0.5
            });
        }
        for columns in &factor_sets {
            for (key, rows) in cells(columns, codes, d.rows()) {
                let cell: Vec<String> = columns
                    .iter()
                    .zip(&key)
                    .map(|(c, k)| {
                        let level = codes
                            .get(c)
                            .and_then(|f| f.levels.get(*k as usize))
                            .map_or("?", |l| l.as_str());
                        format!("{}={}", printable(c), printable(level))
                    })
                    .collect();
                let label = match cell.as_slice() {
                    [one] => format!("level `{one}`"),
                    _ => format!("interaction cell `{}`", cell.join(":")),
                };
                let inside: BTreeSet<usize> = rows.into_iter().collect();
                split_by(label, &|i| inside.contains(&i));
            }
        }
        if let (Some(column), Some(w)) = (&plan.weights, &d.weights) {
            let column = printable(column).into_owned();
            split_by(format!("the rows with positive weight `{column}`"), &|i| {
                w[i] > 0.0
            });
        }
    }
    sets
}

/// The rows a table counts (`train`, `test` or `all`), recorded in the ledger like a split:
/// its cells inside it are protected by the table's own suppression rules.
pub fn table_set(rows: &str, ids: impl IntoIterator<Item = RowId>) -> RowSet {
    RowSet::new(format!("{rows} rows counted by a table"), ids)
}

/// Size of the symmetric difference of two sorted sets, counting no further than `cap`.
fn difference_up_to(a: &[RowId], b: &[RowId], cap: u64) -> u64 {
    let (mut i, mut j, mut d) = (0, 0, 0u64);
    while i < a.len() && j < b.len() && d < cap {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                d += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                d += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    (d + (a.len() - i) as u64 + (b.len() - j) as u64).min(cap.max(d))
}

/// The durable record of released row sets: `state_dir/releases/<dataset>/<rows>-<sha256>.bin`,
/// each file the set's sorted fingerprints (little-endian u64), written atomically. The file
/// name carries the set's size, so only sets of a size within `min_cell` are ever read.
#[derive(Debug)]
pub struct ReleaseLedger {
    dir: PathBuf,
    /// Check-then-record is one step: two experiments loading at once cannot both pass
    /// against a ledger that holds neither.
    lock: Mutex<()>,
}

/// What [`ReleaseLedger::check_and_record`] added: (label, rows, digest) per new set.
pub type Recorded = Vec<(String, usize, String)>;

impl ReleaseLedger {
    pub fn new(state_dir: &Path) -> Self {
        ReleaseLedger {
            dir: state_dir.join("releases"),
            lock: Mutex::new(()),
        }
    }

    fn dataset_dir(&self, dataset: &str) -> PathBuf {
        // Dataset names are free text; the folder is named by their hash.
        self.dir.join(&hex(&Sha256::digest(dataset.as_bytes()))[..32])
    }

    /// Refuse `sets` if one differs from a set released before on `dataset` (or from another
    /// of `sets`) by between 1 and `min_cell - 1` rows; otherwise record the new ones.
    /// `Ok` lists what was recorded; `Err(Error::Policy)` is the refusal.
    pub fn check_and_record(&self, dataset: &str, sets: &[RowSet], min_cell: u64) -> Result<Recorded> {
        self.compare(dataset, sets, min_cell, true)
    }

    /// [`ReleaseLedger::check_and_record`] without recording: for `fedstat-node check`.
    pub fn check(&self, dataset: &str, sets: &[RowSet], min_cell: u64) -> Result<()> {
        self.compare(dataset, sets, min_cell, false).map(drop)
    }

    fn compare(&self, dataset: &str, sets: &[RowSet], min_cell: u64, record: bool) -> Result<Recorded> {
        let _guard = self
            .lock
            .lock()
            .map_err(|_| Error::Ledger("the release ledger lock is poisoned".into()))?;
        let dir = self.dataset_dir(dataset);
        let recorded = self.list(&dir)?;
        let mut new: Vec<(&RowSet, String)> = Vec::new();
        for (n, set) in sets.iter().enumerate() {
            let digest = set.digest();
            if recorded.iter().any(|(_, d)| *d == digest) || new.iter().any(|(_, d)| *d == digest) {
                continue;
            }
            let close = |len: usize| (len as u64).abs_diff(set.ids.len() as u64) < min_cell;
            for (len, d) in recorded.iter().filter(|(len, _)| close(*len)) {
                let other = self.read(&dir, *len, d)?;
                let diff = difference_up_to(&set.ids, &other, min_cell);
                if diff > 0 && diff < min_cell {
                    return Err(Error::Policy(Refusal::Differencing {
                        what: set.label.clone(),
                    }));
                }
            }
            for other in sets[..n].iter().filter(|o| close(o.ids.len())) {
                let diff = difference_up_to(&set.ids, &other.ids, min_cell);
                if diff > 0 && diff < min_cell {
                    return Err(Error::Policy(Refusal::Differencing {
                        what: set.label.clone(),
                    }));
                }
            }
            new.push((set, digest));
        }
        let mut added = Vec::new();
        if !record {
            return Ok(added);
        }
        for (set, digest) in new {
            let bytes: Vec<u8> = set.ids.iter().flat_map(|id| id.to_le_bytes()).collect();
            let path = dir.join(format!("{}-{digest}.bin", set.ids.len()));
            atomic_write(&path, &bytes, Access::OwnerOnly)?;
            added.push((set.label.clone(), set.ids.len(), digest));
        }
        Ok(added)
    }

    /// (rows, digest) of every recorded set.
    fn list(&self, dir: &Path) -> Result<Vec<(usize, String)>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::Ledger(format!("cannot list {}: {e}", dir.display()))),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::Ledger(format!("cannot list {}: {e}", dir.display())))?;
            let name = entry.file_name();
            let Some((len, digest)) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".bin"))
                .and_then(|n| n.split_once('-'))
            else {
                continue; // temporary files of an interrupted write
            };
            let Ok(len) = len.parse::<usize>() else { continue };
            out.push((len, digest.to_owned()));
        }
        Ok(out)
    }

    /// A recorded set, checked against its name: a damaged ledger fails closed.
    fn read(&self, dir: &Path, len: usize, digest: &str) -> Result<Vec<RowId>> {
        let path = dir.join(format!("{len}-{digest}.bin"));
        let bytes = std::fs::read(&path)
            .map_err(|e| Error::Ledger(format!("cannot read {}: {e}", path.display())))?;
        let ids: Vec<RowId> = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        let set = RowSet {
            label: String::new(),
            ids,
        };
        if bytes.len() != len * 8 || set.digest() != digest {
            return Err(Error::Ledger(format!(
                "{} does not match its name: the release ledger is damaged",
                path.display()
            )));
        }
        Ok(set.ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstat_core::data::{load_design_with_codes_from_reader, LoadLimits};
    use fedstat_core::spec::{CategoricalFeature, DataSchema, ModelKind, NumericFeature, TargetSpec};

    fn schema(threshold: f64) -> DataSchema {
        DataSchema {
            split_column: "split".into(),
            target: Some(TargetSpec {
                column: "wage".into(),
                log: false,
                threshold: Some(threshold),
                positive_level: None,
            }),
            numeric: vec![NumericFeature {
                column: "age".into(),
                squared: false,
            }],
            categorical: vec![CategoricalFeature {
                column: "region".into(),
                levels: vec!["a".into(), "b".into(), "c".into()],
                reference: "a".into(),
            }],
        }
    }

    /// `n` rows per split: wage = row number, region `a` for 3/4 of the rows and `b` for the
    /// rest, unless `rare_c` rows take level `c`.
    fn csv(n: usize, rare_c: usize) -> String {
        let mut text = String::from("wage,age,region,split\n");
        for split in ["train", "test"] {
            for i in 0..n {
                let region = if i < rare_c {
                    "c"
                } else if i % 4 == 0 {
                    "b"
                } else {
                    "a"
                };
                text.push_str(&format!("{i},{},{region},{split}\n", 20 + i % 40));
            }
        }
        text
    }

    /// A design, its data and level codes, loaded as a node does.
    struct Loaded {
        plan: DesignPlan,
        data: LocalData,
        codes: FactorCodes,
    }

    impl Loaded {
        fn check(&self, min_cell: u64) -> Result<(), Refusal> {
            check_cells(&self.plan, &self.data, &self.codes, min_cell)
        }

        fn sets(&self) -> Vec<RowSet> {
            released_sets(&self.plan, &self.data, &self.codes)
        }
    }

    fn load_plan(text: &str, plan: DesignPlan) -> Loaded {
        let (data, codes) =
            load_design_with_codes_from_reader("t.csv", text.as_bytes(), &plan, None, LoadLimits::UNLIMITED)
                .expect("loads");
        Loaded { plan, data, codes }
    }

    fn load(text: &str, s: &DataSchema) -> Loaded {
        load_plan(
            text,
            DesignPlan::from_schema(s, None, ModelKind::Logistic).expect("plan"),
        )
    }

    #[test]
    fn cell_rules_name_the_rule_column_and_split() {
        let s = schema(49.5);
        assert_eq!(load(&csv(100, 0), &s).check(10), Ok(()));
        // Level `c` held by 0 rows is fine; by 3 rows it is refused.
        assert_eq!(
            load(&csv(100, 3), &s).check(10),
            Err(Refusal::SmallLevel {
                column: "region".into(),
                split: Split::Train
            })
        );
        // One row above the threshold: the one-row class.
        let one = schema(98.5);
        assert_eq!(
            load(&csv(100, 0), &one).check(10),
            Err(Refusal::SmallClass {
                column: "wage".into(),
                split: Split::Train
            })
        );
        // An empty class is refused too: a class is never empty or small.
        let none = schema(1e9);
        assert!(load(&csv(100, 0), &none).check(10).is_err());
        // Too few rows in a split.
        assert_eq!(
            load(&csv(9, 0), &s).check(10),
            Err(Refusal::SmallSplit { split: Split::Train })
        );
        let text = Refusal::SmallLevel {
            column: "region".into(),
            split: Split::Test,
        }
        .to_string();
        assert!(
            text.contains("policy.min_cell") && text.contains("`region`"),
            "{text}"
        );
    }

    #[test]
    fn differencing_two_thresholds_one_row_apart_is_refused_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = csv(100, 0);
        let sets = |t: f64| {
            let s = schema(t);
            load(&text, &s).sets()
        };
        let ledger = ReleaseLedger::new(dir.path());
        let first = ledger.check_and_record("cps", &sets(49.5), 10).expect("first");
        assert!(!first.is_empty());
        // The same experiment again (or re-run under a new id) releases nothing new.
        assert!(ledger
            .check_and_record("cps", &sets(49.5), 10)
            .expect("same")
            .is_empty());
        // A restarted node reads the record from disk: one row apart is refused.
        let ledger = ReleaseLedger::new(dir.path());
        let err = ledger
            .check_and_record("cps", &sets(50.5), 10)
            .expect_err("one row apart");
        assert!(
            matches!(&err, Error::Policy(Refusal::Differencing { what }) if what.contains("positive class")),
            "{err}"
        );
        assert!(!err.to_string().contains("50"), "{err}");
        // Ten rows apart is allowed; another dataset has its own record.
        ledger
            .check_and_record("cps", &sets(59.5), 10)
            .expect("ten apart");
        ledger
            .check_and_record("other", &sets(50.5), 10)
            .expect("other dataset");
    }

    #[test]
    fn adding_one_person_to_the_file_is_a_differencing_risk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = ReleaseLedger::new(dir.path());
        let s = schema(49.5);
        let text = csv(100, 0);
        ledger
            .check_and_record("cps", &load(&text, &s).sets(), 10)
            .expect("first");
        let more = format!("{text}77,30,a,train\n");
        let err = ledger
            .check_and_record("cps", &load(&more, &s).sets(), 10)
            .expect_err("one more row");
        assert!(
            matches!(err, Error::Policy(Refusal::Differencing { .. })),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_ledger_fails_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = ReleaseLedger::new(dir.path());
        let s = schema(49.5);
        let data = load(&csv(100, 0), &s);
        ledger.check_and_record("cps", &data.sets(), 10).expect("first");
        for entry in walk(&dir.path().join("releases")) {
            std::fs::write(&entry, b"garbage!").expect("damage");
        }
        let s2 = schema(50.5);
        let err = ledger
            .check_and_record("cps", &load(&csv(100, 0), &s2).sets(), 10)
            .expect_err("damaged");
        assert!(matches!(err, Error::Ledger(_)), "{err}");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn symmetric_difference_counts_up_to_the_cap() {
        assert_eq!(difference_up_to(&[1, 2, 3], &[1, 2, 3], 10), 0);
        assert_eq!(difference_up_to(&[1, 2, 3], &[1, 3], 10), 1);
        assert_eq!(difference_up_to(&[1, 2], &[3, 4], 10), 4);
        assert_eq!(difference_up_to(&[], &[3, 4], 10), 2);
        assert!(difference_up_to(&(0..100).collect::<Vec<_>>(), &[], 10) >= 10);
    }

    /// A form with a formula over `wage,age,region,sex,w,split` (linear, exact).
    fn formula_plan(rhs: &str, extra: &str) -> DesignPlan {
        let text = format!(
            "name = \"t\"\ndataset = \"d\"\nmodel = \"linear\"\nmethod = \"exact\"\n\
             formula = \"wage ~ {rhs}\"\n{extra}\n[schema]\ncategorical = [\
             {{ column = \"region\", levels = [\"a\", \"b\"], reference = \"a\" }}, \
             {{ column = \"sex\", levels = [\"m\", \"f\"], reference = \"m\" }}]\n"
        );
        toml::from_str::<fedstat_core::spec::ExperimentSpec>(&text)
            .expect("spec")
            .design()
            .expect("plan")
    }

    /// `n` rows per split: region `b` on every fourth row; sex `f` on odd rows and on the
    /// `b` rows below 12, so the cell (b, f) holds 3 rows while every level holds many.
    /// `w` is 1; `w2` is 0 on the first 2 train rows and `w12` on the first 12, else 1.
    fn csv2(n: usize) -> String {
        let mut text = String::from("wage,age,region,sex,w,w2,w12,split\n");
        for split in ["train", "test"] {
            for i in 0..n {
                let region = if i % 4 == 0 { "b" } else { "a" };
                let sex = if i % 4 == 0 && i < 12 || i % 2 == 1 {
                    "f"
                } else {
                    "m"
                };
                let w = |k: usize| if split == "train" && i < k { 0 } else { 1 };
                text.push_str(&format!(
                    "{i},{},{region},{sex},1,{},{},{split}\n",
                    20 + i % 40,
                    w(2),
                    w(12)
                ));
            }
        }
        text
    }

    #[test]
    fn a_small_cell_of_a_factor_interaction_is_refused_naming_the_rule() {
        let text = csv2(100);
        // Each factor alone passes: every level and its complement hold at least 10 rows.
        assert_eq!(
            load_plan(&text, formula_plan("age + region + sex", "")).check(10),
            Ok(())
        );
        // Their interaction has a 3-row cell.
        for rhs in ["region*sex", "age + region:sex", "age:region:sex"] {
            assert_eq!(
                load_plan(&text, formula_plan(rhs, "")).check(10),
                Err(Refusal::SmallCell {
                    columns: "region:sex".into(),
                    split: Split::Train
                }),
                "{rhs}"
            );
        }
        // A factor × number interaction is a sum over each level: the level rule covers it.
        assert_eq!(load_plan(&text, formula_plan("age*region", "")).check(10), Ok(()));
        let refusal = Refusal::SmallCell {
            columns: "region:sex".into(),
            split: Split::Train,
        }
        .to_string();
        assert!(
            refusal.contains("policy.min_cell") && refusal.contains("`region:sex`"),
            "{refusal}"
        );
        assert!(!refusal.chars().any(|c| c.is_ascii_digit()), "{refusal}");
        // Each interaction cell is also a released set, so differencing covers it.
        let sets = load_plan(&text, formula_plan("region*sex", "")).sets();
        assert!(
            sets.iter()
                .any(|s| s.label.contains("interaction cell `region=b:sex=f`") && s.ids.len() == 3),
            "{:?}",
            sets.iter().map(|s| &s.label).collect::<Vec<_>>()
        );
    }

    #[test]
    fn weights_that_drop_a_few_rows_of_an_earlier_release_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = ReleaseLedger::new(dir.path());
        let plan = |w: &str| formula_plan("age + region", &format!("weights = \"{w}\""));
        let text = csv2(100);
        let first = load_plan(&text, plan("w")).sets();
        ledger
            .check_and_record("cps", &first, 10)
            .expect("all rows weighted");
        // The same people, two of them weighted 0: a sum over all but those two.
        let err = ledger
            .check_and_record("cps", &load_plan(&text, plan("w2")).sets(), 10)
            .expect_err("two rows apart");
        assert!(
            matches!(&err, Error::Policy(Refusal::Differencing { what }) if what.contains("positive weight `w2`")),
            "{err}"
        );
        // Within one experiment too: the weighted rows and the training rows are two sets.
        let fresh = ReleaseLedger::new(&dir.path().join("other"));
        let err = fresh
            .check_and_record("cps", &load_plan(&text, plan("w2")).sets(), 10)
            .expect_err("two rows apart within one experiment");
        assert!(
            matches!(err, Error::Policy(Refusal::Differencing { .. })),
            "{err}"
        );
        // Weights that drop ten rows or more are allowed.
        fresh
            .check_and_record("cps", &load_plan(&text, plan("w12")).sets(), 10)
            .expect("twelve apart");
    }
}
