//! The columns a table needs, read from a node's CSV: level codes of the `by` columns, values
//! of the numeric columns, which rows the table counts. A small private reader (one record per
//! line, split by csv-core, BOM and CRLF tolerant, blank lines skipped) until the shared typed
//! column loader lands; errors name file, line and column, never a value.

use std::io::{BufRead, BufReader, Read};

use fedstat_proto::table::TableRows;

use crate::error::{CsvProblem, DatasetProblem};
use crate::{Error, Result};

use super::Layout;

/// The columns of one node's rows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Columns {
    /// Per `by` column, each row's level index.
    pub codes: Vec<Vec<u32>>,
    /// Per numeric column, each row's value (unchecked against the bounds: [`super::tabulate`]
    /// does that).
    pub values: Vec<Vec<f64>>,
    /// Whether each row is in the table's `rows`.
    pub selected: Vec<bool>,
}

impl Columns {
    /// Rows the table counts.
    pub fn selected_rows(&self) -> u64 {
        self.selected.iter().filter(|s| **s).count() as u64
    }
}

/// Split one line into trimmed fields (csv-core, RFC 4180 quoting; the end of the line ends
/// the record). `Err(())` if csv-core finds no record.
fn split(line: &str) -> std::result::Result<Vec<String>, ()> {
    use csv_core::ReadRecordResult as R;
    let mut rdr = csv_core::ReaderBuilder::new().build();
    let mut out = vec![0u8; line.len() + 1];
    let mut ends = vec![0usize; line.bytes().filter(|b| *b == b',').count() + 2];
    let mut input = line.as_bytes();
    let (mut nout, mut nend) = (0, 0);
    // Twice the line's length in calls is more than csv-core ever needs; then give up.
    for _ in 0..2 * line.len() + 8 {
        let (res, nin, o, e) = rdr.read_record(input, &mut out[nout..], &mut ends[nend..]);
        input = &input[nin..];
        nout += o;
        nend += e;
        match res {
            R::Record => {
                let mut start = 0;
                return Ok(ends[..nend]
                    .iter()
                    .map(|&end| {
                        let f = String::from_utf8_lossy(&out[start..end]).trim().to_owned();
                        start = end;
                        f
                    })
                    .collect());
            }
            // The line is consumed: the next call, with no input, is the end of the record.
            R::InputEmpty => {}
            R::End => return Err(()),
            R::OutputFull => out.resize(out.len() * 2 + 1, 0),
            R::OutputEndsFull => ends.resize(ends.len() * 2 + 1, 0),
        }
    }
    Err(())
}

/// Read the table's columns; `file_label` is what errors call the file. At most `max_rows`
/// rows are read (the node's memory budget).
pub fn read_columns(
    file_label: &str,
    reader: impl Read,
    layout: &Layout,
    split_column: &str,
    max_rows: u64,
) -> Result<Columns> {
    let csv = |line: u64, column: &str, problem: CsvProblem| Error::Csv {
        file: file_label.to_owned(),
        line,
        column: column.to_owned(),
        problem,
    };
    let mut lines = BufReader::new(reader);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    let mut header: Option<Vec<String>> = None;
    let mut by_idx = Vec::new();
    let mut num_idx = Vec::new();
    let mut split_idx = 0;
    let mut cols = Columns {
        codes: vec![Vec::new(); layout.by.len()],
        values: vec![Vec::new(); layout.numeric.len()],
        selected: Vec::new(),
    };
    loop {
        buf.clear();
        let read = lines.read_until(b'\n', &mut buf).map_err(|e| Error::Dataset {
            file: file_label.to_owned(),
            problem: DatasetProblem::Read {
                after_line: line_no,
                error: e.to_string(),
            },
        })?;
        if read == 0 {
            break;
        }
        line_no += 1;
        let mut bytes: &[u8] = &buf;
        if line_no == 1 {
            bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
        }
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let text = std::str::from_utf8(bytes).map_err(|_| Error::Dataset {
            file: file_label.to_owned(),
            problem: DatasetProblem::NotUtf8 { line: line_no },
        })?;
        if text.trim().is_empty() {
            if header.is_none() {
                return Err(csv(line_no, "(header)", CsvProblem::EmptyFile));
            }
            continue;
        }
        let fields = split(text).map_err(|()| csv(line_no, "(row)", CsvProblem::UnterminatedQuote))?;
        let Some(head) = &header else {
            let find = |name: &str| {
                fields
                    .iter()
                    .position(|f| f == name)
                    .ok_or_else(|| {
                        csv(
                            line_no,
                            name,
                            CsvProblem::MissingColumn {
                                header: fields.clone(),
                            },
                        )
                    })
            };
            by_idx = layout.by.iter().map(|c| find(c)).collect::<Result<_>>()?;
            num_idx = layout
                .numeric
                .iter()
                .map(|n| find(&n.column))
                .collect::<Result<_>>()?;
            split_idx = find(split_column)?;
            header = Some(fields);
            continue;
        };
        if fields.len() != head.len() {
            let column = head
                .get(fields.len())
                .cloned()
                .unwrap_or_else(|| "(beyond the header)".to_owned());
            return Err(csv(
                line_no,
                &column,
                CsvProblem::FieldCount {
                    expected: head.len(),
                    found: fields.len(),
                },
            ));
        }
        if cols.selected.len() as u64 >= max_rows {
            return Err(Error::Dataset {
                file: file_label.to_owned(),
                problem: DatasetProblem::OverBudget { max_cells: max_rows },
            });
        }
        let selected = match fields[split_idx].as_str() {
            "train" => layout.rows != TableRows::Test,
            "test" => layout.rows != TableRows::Train,
            _ => return Err(csv(line_no, split_column, CsvProblem::BadSplit)),
        };
        cols.selected.push(selected);
        for (i, &c) in by_idx.iter().enumerate() {
            let value = &fields[c];
            let code = layout.levels[i]
                .iter()
                .position(|l| l == value)
                .ok_or_else(|| csv(line_no, &layout.by[i], CsvProblem::UnknownLevel))?;
            cols.codes[i].push(code as u32);
        }
        for (m, &c) in num_idx.iter().enumerate() {
            let column = &layout.numeric[m].column;
            let value = fields[c].as_str();
            let x = match value {
                "" => return Err(csv(line_no, column, CsvProblem::EmptyValue)),
                "NA" => return Err(csv(line_no, column, CsvProblem::MissingValueMarker)),
                v => v
                    .parse::<f64>()
                    .map_err(|_| csv(line_no, column, CsvProblem::NotANumber))?,
            };
            if !x.is_finite() {
                return Err(csv(line_no, column, CsvProblem::NotFinite));
            }
            cols.values[m].push(x);
        }
    }
    if header.is_none() {
        return Err(csv(1, "(header)", CsvProblem::EmptyFile));
    }
    if cols.selected.is_empty() {
        return Err(csv(line_no + 1, "(first data row)", CsvProblem::NoDataRows));
    }
    Ok(cols)
}

#[cfg(test)]
mod tests {
    use fedstat_proto::table::TableNumeric;

    use super::*;

    #[test]
    fn columns_are_read_by_name_with_quotes_bom_and_crlf() {
        let layout = Layout::from_parts(
            vec!["a".into()],
            vec![vec!["x".into(), "y, z".into()]],
            vec![TableNumeric {
                column: "w".into(),
                min: 0.0,
                max: 10.0,
                clip: false,
                bins: vec![],
                quantiles: vec![],
            }],
            TableRows::Train,
        );
        let text = "\u{feff}w,a,split\r\n1.5,x,train\r\n\r\n2,\"y, z\",test\n3,x,train\n";
        let c = read_columns("f.csv", text.as_bytes(), &layout, "split", 100).expect("read");
        assert_eq!(c.codes, vec![vec![0, 1, 0]]);
        assert_eq!(c.values, vec![vec![1.5, 2.0, 3.0]]);
        assert_eq!(c.selected, vec![true, false, true]);
        let bad = "w,a,split\n1,q,train\n";
        let err = read_columns("f.csv", bad.as_bytes(), &layout, "split", 100).expect_err("level");
        assert_eq!(err.public(), "column `a`: a value is not one of the levels listed in the experiment (levels are case-sensitive)");
        let err = read_columns("f.csv", "w,a,split\nx1,x,train\n".as_bytes(), &layout, "split", 100)
            .expect_err("number");
        assert!(err.to_string().contains("line 2, column `w`"), "{err}");
        assert!(!err.public().contains("x1"));
    }
}
