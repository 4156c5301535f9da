//! Catalog import files (CSV or JSON) turned into catalog field writes, validated row by row.
//! Pure functions of the file's bytes: every bad row is reported with its line number and
//! field (up to [`MAX_ERRORS`]), and a file with any bad row yields no rows at all, so HQ fixes
//! the file and sends it again instead of finding half a catalog applied.
//!
//! CSV: a header line naming the columns (`sku,name,gtins,unit,tax_class,discontinued,category`,
//! in any order; `discontinued` and `category` may be left out), RFC 4180 quoting (`"a, b"`,
//! `""` for a quote, line breaks inside quotes), LF or CRLF line endings, an optional UTF-8 byte
//! order mark. GTINs are separated by `;`. JSON: an array of objects with the same fields,
//! `gtins` an array of strings (or one `;`-separated string), `discontinued` a boolean; a row's
//! line is where its object starts.
//!
//! The `category` (e.g. `dairy`) is what store policies such as the online allocation target
//! match on; an empty or absent one writes no category field.
//!
//! Bounds: at most [`MAX_ROWS`] rows a file, [`MAX_GTINS`] GTINs a row, names of at most
//! [`MAX_NAME_CHARS`] characters, categories of at most [`MAX_CATEGORY_LEN`] bytes; the HTTP
//! layer bounds the file's bytes.

use std::collections::HashMap;

use serde::Serialize;
use shared::{CatalogField, Gtin, Sku, TaxClass, Unit};

use crate::storage::CatalogWrite;

/// Most errors reported for one file; the total is reported beside them.
pub const MAX_ERRORS: usize = 100;
/// Most rows in one file (each row is five field writes in one transaction).
pub const MAX_ROWS: usize = 100_000;
pub const MAX_GTINS: usize = 32;
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_TAX_CLASS_LEN: usize = 32;
pub const MAX_CATEGORY_LEN: usize = 64;

/// The known columns; the first five are required.
const COLUMNS: [&str; 7] = ["sku", "name", "gtins", "unit", "tax_class", "discontinued", "category"];

/// One valid row of an import file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogRow {
    /// Line of the file the row starts on (1-based; the CSV header is line 1).
    pub line: usize,
    pub sku: Sku,
    pub name: String,
    pub gtins: Vec<Gtin>,
    pub unit: Unit,
    pub tax_class: TaxClass,
    pub discontinued: bool,
    /// `None` when the file gives none: no category field is written.
    pub category: Option<String>,
}

impl CatalogRow {
    /// The row as field writes, one per field (five, six with a category).
    pub fn writes(&self) -> impl Iterator<Item = CatalogWrite> + '_ {
        [
            CatalogField::Name(self.name.clone()),
            CatalogField::Gtins(self.gtins.clone()),
            CatalogField::Unit(self.unit),
            CatalogField::TaxClass(self.tax_class.clone()),
            CatalogField::Discontinued(self.discontinued),
        ]
        .into_iter()
        .chain(self.category.clone().map(CatalogField::Category))
        .map(|field| CatalogWrite { sku: self.sku.clone(), field })
    }
}

/// One problem in an import file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowError {
    pub line: usize,
    /// The column at fault; `None` for a problem with the whole row or file.
    pub field: Option<String>,
    pub message: String,
}

/// Why a file was refused: the first [`MAX_ERRORS`] problems and how many there were.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportErrors {
    pub errors: Vec<RowError>,
    pub total: usize,
}

/// Collects errors up to the cap while counting all of them.
#[derive(Default)]
struct Errors {
    errors: Vec<RowError>,
    total: usize,
}

impl Errors {
    fn push(&mut self, line: usize, field: Option<&str>, message: impl Into<String>) {
        self.total += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(RowError { line, field: field.map(str::to_owned), message: message.into() });
        }
    }

    fn finish(self, rows: Vec<CatalogRow>) -> Result<Vec<CatalogRow>, ImportErrors> {
        if self.total == 0 {
            Ok(rows)
        } else {
            Err(ImportErrors { errors: self.errors, total: self.total })
        }
    }
}

fn file_error(line: usize, message: impl Into<String>) -> ImportErrors {
    ImportErrors { errors: vec![RowError { line, field: None, message: message.into() }], total: 1 }
}

/// The file as UTF-8 text without its byte order mark.
fn text_of(bytes: &[u8]) -> Result<&str, ImportErrors> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        file_error(line, format!("the file is not UTF-8 (invalid byte at offset {})", e.valid_up_to()))
    })
}

/// The fields of one row before validation, as text; `None` when absent.
#[derive(Default)]
struct RawRow {
    sku: Option<String>,
    name: Option<String>,
    gtins: Option<Vec<String>>,
    unit: Option<String>,
    tax_class: Option<String>,
    discontinued: Option<Result<bool, String>>,
    category: Option<String>,
}

/// Validates rows, including across rows (a SKU or a GTIN given twice).
struct Validator {
    errors: Errors,
    rows: Vec<CatalogRow>,
    skus: HashMap<Sku, usize>,
    gtins: HashMap<Gtin, (usize, Sku)>,
}

impl Validator {
    fn new() -> Validator {
        Validator { errors: Errors::default(), rows: Vec::new(), skus: HashMap::new(), gtins: HashMap::new() }
    }

    fn row(&mut self, line: usize, raw: RawRow) {
        let before = self.errors.total;
        let e = &mut self.errors;
        let sku = match raw.sku.as_deref().map(str::trim) {
            None | Some("") => {
                e.push(line, Some("sku"), "missing SKU");
                None
            }
            Some(s) => match Sku::new(s) {
                Ok(sku) => match self.skus.get(&sku) {
                    Some(first) => {
                        e.push(line, Some("sku"), format!("SKU {sku} is already given on line {first}"));
                        None
                    }
                    None => Some(sku),
                },
                Err(err) => {
                    e.push(line, Some("sku"), err.to_string());
                    None
                }
            },
        };
        let name = match raw.name.as_deref().map(str::trim) {
            None | Some("") => {
                e.push(line, Some("name"), "missing name");
                None
            }
            Some(n) if n.chars().count() > MAX_NAME_CHARS => {
                e.push(line, Some("name"), format!("longer than {MAX_NAME_CHARS} characters"));
                None
            }
            Some(n) if n.chars().any(char::is_control) => {
                e.push(line, Some("name"), "contains a control character (a line break or a tab)");
                None
            }
            Some(n) => Some(n.to_owned()),
        };
        let mut gtins = Vec::new();
        let texts: Vec<String> = raw.gtins.unwrap_or_default();
        let texts: Vec<&str> = texts.iter().map(|g| g.trim()).filter(|g| !g.is_empty()).collect();
        if texts.len() > MAX_GTINS {
            e.push(line, Some("gtins"), format!("{} GTINs; at most {MAX_GTINS} a SKU", texts.len()));
        } else {
            for text in texts {
                match Gtin::parse(text) {
                    Ok(g) if gtins.contains(&g) => e.push(line, Some("gtins"), format!("GTIN {text} is listed twice")),
                    Ok(g) => match (self.gtins.get(&g), &sku) {
                        (Some((first, other)), Some(sku)) if other != sku => e.push(
                            line,
                            Some("gtins"),
                            format!("GTIN {text} already belongs to SKU {other} (line {first})"),
                        ),
                        _ => gtins.push(g),
                    },
                    Err(err) => e.push(line, Some("gtins"), err.to_string()),
                }
            }
        }
        let unit = match raw.unit.as_deref().map(str::trim) {
            None | Some("") => {
                e.push(line, Some("unit"), "missing unit: expected \"piece\" or \"gram\"");
                None
            }
            Some(u) => match u.parse::<Unit>() {
                Ok(unit) => Some(unit),
                Err(msg) => {
                    e.push(line, Some("unit"), msg);
                    None
                }
            },
        };
        let tax_class = match raw.tax_class.as_deref().map(str::trim) {
            None | Some("") => {
                e.push(line, Some("tax_class"), "missing tax class (e.g. standard, reduced)");
                None
            }
            Some(t)
                if t.len() > MAX_TAX_CLASS_LEN
                    || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                e.push(
                    line,
                    Some("tax_class"),
                    format!(
                        "invalid tax class {:?}: up to {MAX_TAX_CLASS_LEN} ASCII letters, digits, '-' or '_'",
                        t.chars().take(40).collect::<String>()
                    ),
                );
                None
            }
            Some(t) => Some(TaxClass(t.to_owned())),
        };
        let discontinued = match raw.discontinued {
            None => Some(false),
            Some(Ok(d)) => Some(d),
            Some(Err(msg)) => {
                e.push(line, Some("discontinued"), msg);
                None
            }
        };
        let category = match raw.category.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(c)
                if c.len() > MAX_CATEGORY_LEN
                    || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)) =>
            {
                e.push(
                    line,
                    Some("category"),
                    format!(
                        "invalid category {:?}: up to {MAX_CATEGORY_LEN} ASCII letters, digits, '-', '_', '.' or '/'",
                        c.chars().take(40).collect::<String>()
                    ),
                );
                None
            }
            Some(c) => Some(c.to_owned()),
        };
        if self.errors.total > before {
            return;
        }
        let (Some(sku), Some(name), Some(unit), Some(tax_class), Some(discontinued)) =
            (sku, name, unit, tax_class, discontinued)
        else {
            return;
        };
        self.skus.insert(sku.clone(), line);
        for g in &gtins {
            self.gtins.entry(*g).or_insert_with(|| (line, sku.clone()));
        }
        self.rows.push(CatalogRow { line, sku, name, gtins, unit, tax_class, discontinued, category });
    }

    fn finish(mut self, line_after: usize) -> Result<Vec<CatalogRow>, ImportErrors> {
        if self.rows.is_empty() && self.errors.total == 0 {
            self.errors.push(line_after, None, "the file holds no rows");
        }
        self.errors.finish(self.rows)
    }
}

fn parse_flag(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "false" | "0" | "no" => Ok(false),
        "true" | "1" | "yes" => Ok(true),
        _ => {
            Err(format!("invalid value {:?}: expected true or false", text.trim().chars().take(40).collect::<String>()))
        }
    }
}

/// One CSV record: its fields and the line it starts on.
struct Record {
    line: usize,
    fields: Vec<String>,
}

/// Splits CSV text into records (RFC 4180). Errors name the line of the fault.
fn csv_records(text: &str) -> Result<Vec<Record>, ImportErrors> {
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    loop {
        // Skip blank lines between records.
        while let Some(&c) = chars.peek() {
            if c == '\n' {
                line += 1;
                chars.next();
            } else if c == '\r' {
                chars.next();
            } else {
                break;
            }
        }
        if chars.peek().is_none() {
            return Ok(records);
        }
        if records.len() > MAX_ROWS {
            return Err(file_error(line, format!("more than {MAX_ROWS} rows: split the file")));
        }
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        loop {
            match chars.next() {
                None => {
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                Some('"') if field.is_empty() && !quoted => {
                    quoted = true;
                    loop {
                        match chars.next() {
                            None => return Err(file_error(start, "a quoted field is not closed")),
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                field.push('"');
                            }
                            Some('"') => break,
                            Some(c) => {
                                if c == '\n' {
                                    line += 1;
                                }
                                field.push(c);
                            }
                        }
                    }
                    match chars.peek() {
                        None | Some(',') | Some('\n') | Some('\r') => {}
                        Some(c) => {
                            return Err(file_error(line, format!("unexpected {c:?} after a closing quote")));
                        }
                    }
                }
                Some(',') => {
                    fields.push(std::mem::take(&mut field));
                    quoted = false;
                }
                Some('\r') if chars.peek() == Some(&'\n') => {}
                Some('\n') | Some('\r') => {
                    line += 1;
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                Some(c) => field.push(c),
            }
        }
        records.push(Record { line: start, fields });
    }
}

/// Parses a CSV import file.
pub fn parse_csv(bytes: &[u8]) -> Result<Vec<CatalogRow>, ImportErrors> {
    let text = text_of(bytes)?;
    let records = csv_records(text)?;
    let Some((header, rows)) = records.split_first() else {
        return Err(file_error(1, format!("the file is empty: expected a header line {}", COLUMNS.join(","))));
    };
    // Column index of each known name.
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut errors = Errors::default();
    for (i, name) in header.fields.iter().enumerate() {
        let name = name.trim();
        match COLUMNS.iter().find(|c| c.eq_ignore_ascii_case(name)) {
            Some(c) if index.contains_key(c) => errors.push(header.line, Some(c), format!("column {c} is given twice")),
            Some(c) => {
                index.insert(c, i);
            }
            None => errors.push(
                header.line,
                None,
                format!(
                    "unknown column {:?}: expected {}",
                    name.chars().take(40).collect::<String>(),
                    COLUMNS.join(",")
                ),
            ),
        }
    }
    for c in &COLUMNS[..5] {
        if !index.contains_key(c) {
            errors.push(header.line, Some(c), format!("the header has no {c} column"));
        }
    }
    if errors.total > 0 {
        return errors.finish(Vec::new());
    }
    let mut v = Validator::new();
    for record in rows {
        if record.fields.len() != header.fields.len() {
            v.errors.push(
                record.line,
                None,
                format!("{} fields, the header has {}", record.fields.len(), header.fields.len()),
            );
            continue;
        }
        let get = |c: &str| index.get(c).map(|&i| record.fields[i].clone());
        let raw = RawRow {
            sku: get("sku"),
            name: get("name"),
            gtins: get("gtins").map(|g| g.split(';').map(str::to_owned).collect()),
            unit: get("unit"),
            tax_class: get("tax_class"),
            discontinued: get("discontinued").map(|d| parse_flag(&d)),
            category: get("category"),
        };
        v.row(record.line, raw);
    }
    let after = records.last().map_or(1, |r| r.line + 1);
    v.finish(after)
}

/// Byte offsets where the elements of a top-level JSON array start (the text is known to parse).
fn json_element_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut expecting = false;
    for (i, b) in text.bytes().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if depth == 1 && expecting && b != b']' {
            starts.push(i);
            expecting = false;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expecting = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    starts
}

/// Parses a JSON import file.
pub fn parse_json(bytes: &[u8]) -> Result<Vec<CatalogRow>, ImportErrors> {
    use serde_json::Value;
    let text = text_of(bytes)?;
    let items: Vec<Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(items)) => items,
        Ok(_) => return Err(file_error(1, "expected a JSON array of catalog rows")),
        Err(e) => return Err(file_error(e.line().max(1), format!("invalid JSON: {e}"))),
    };
    if items.len() > MAX_ROWS {
        return Err(file_error(1, format!("more than {MAX_ROWS} rows: split the file")));
    }
    let starts = json_element_starts(text);
    let line_of = |i: usize| starts.get(i).map_or(1, |&offset| text[..offset].matches('\n').count() + 1);
    let mut v = Validator::new();
    for (i, item) in items.iter().enumerate() {
        let line = line_of(i);
        let Value::Object(map) = item else {
            v.errors.push(line, None, "expected an object with sku, name, gtins, unit, tax_class");
            continue;
        };
        let mut bad = false;
        let mut raw = RawRow::default();
        for (key, value) in map {
            let mut text_field = |slot: &mut Option<String>| match value {
                Value::String(s) => *slot = Some(s.clone()),
                Value::Null => {}
                _ => {
                    v.errors.push(line, Some(key), "expected a string");
                    bad = true;
                }
            };
            match key.as_str() {
                "sku" => text_field(&mut raw.sku),
                "name" => text_field(&mut raw.name),
                "unit" => text_field(&mut raw.unit),
                "tax_class" => text_field(&mut raw.tax_class),
                "category" => text_field(&mut raw.category),
                "gtins" => match value {
                    Value::String(s) => raw.gtins = Some(s.split(';').map(str::to_owned).collect()),
                    Value::Null => {}
                    Value::Array(a) if a.iter().all(Value::is_string) => {
                        raw.gtins = Some(a.iter().filter_map(|g| g.as_str().map(str::to_owned)).collect());
                    }
                    _ => {
                        v.errors.push(line, Some("gtins"), "expected an array of GTIN strings");
                        bad = true;
                    }
                },
                "discontinued" => match value {
                    Value::Bool(d) => raw.discontinued = Some(Ok(*d)),
                    Value::Null => {}
                    _ => raw.discontinued = Some(Err("expected true or false".into())),
                },
                other => {
                    v.errors.push(line, Some(other), format!("unknown field: expected one of {}", COLUMNS.join(", ")));
                    bad = true;
                }
            }
        }
        if !bad {
            v.row(line, raw);
        }
    }
    let after = text.matches('\n').count() + 1;
    v.finish(after)
}

/// All field writes of the rows, in file order.
pub fn writes(rows: &[CatalogRow]) -> Vec<CatalogWrite> {
    rows.iter().flat_map(CatalogRow::writes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "sku,name,gtins,unit,tax_class,discontinued\n";

    fn csv(body: &str) -> Result<Vec<CatalogRow>, ImportErrors> {
        parse_csv(format!("{HEADER}{body}").as_bytes())
    }

    fn fields(e: &ImportErrors) -> Vec<(usize, Option<&str>)> {
        e.errors.iter().map(|r| (r.line, r.field.as_deref())).collect()
    }

    #[test]
    fn a_good_file_gives_rows_and_five_writes_each() {
        let rows =
            csv("MILK,Milk 1 l,4006381333931;96385074,piece,reduced,false\nCHEESE,Cheese,,gram,standard,\n").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].line, 2);
        assert_eq!(rows[0].gtins.len(), 2);
        assert_eq!(rows[1].unit, Unit::Gram);
        assert!(rows[1].gtins.is_empty() && !rows[1].discontinued);
        let w = writes(&rows);
        assert_eq!(w.len(), 10);
        assert_eq!(w[0].field, CatalogField::Name("Milk 1 l".into()));
        assert_eq!(w[4].field, CatalogField::Discontinued(false));
    }

    #[test]
    fn a_bad_check_digit_names_the_line_and_field() {
        let e = csv("MILK,Milk,4006381333932,piece,reduced,false\n").unwrap_err();
        assert_eq!(fields(&e), vec![(2, Some("gtins"))]);
        assert!(e.errors[0].message.contains("check digit"), "{:?}", e);
    }

    #[test]
    fn an_unknown_unit_is_refused() {
        let e = csv("MILK,Milk,,litre,reduced,false\n").unwrap_err();
        assert_eq!(fields(&e), vec![(2, Some("unit"))]);
        assert!(e.errors[0].message.contains("litre"));
    }

    #[test]
    fn a_missing_sku_is_refused() {
        let e = csv("OK,Fine,,piece,standard,\n,Nameless,,piece,standard,false\n").unwrap_err();
        assert_eq!(fields(&e), vec![(3, Some("sku"))]);
        assert_eq!(e.errors[0].message, "missing SKU");
    }

    #[test]
    fn a_duplicate_sku_names_both_lines() {
        let e = csv("MILK,Milk,,piece,reduced,\nBREAD,Bread,,piece,reduced,\nMILK,Milk again,,piece,reduced,\n")
            .unwrap_err();
        assert_eq!(fields(&e), vec![(4, Some("sku"))]);
        assert!(e.errors[0].message.contains("line 2"), "{:?}", e);
    }

    #[test]
    fn one_gtin_on_two_skus_is_refused() {
        let e = csv("A,A,4006381333931,piece,standard,\nB,B,4006381333931,piece,standard,\n").unwrap_err();
        assert_eq!(fields(&e), vec![(3, Some("gtins"))]);
    }

    #[test]
    fn quoted_fields_keep_commas_quotes_and_line_breaks() {
        let rows = csv("MILK,\"Milk, whole \"\"organic\"\"\",\"4006381333931; 96385074\",piece,reduced,\"false\"\nB,\"Two\nlines\",,piece,reduced,\n")
            .unwrap_err();
        // A line break inside a name is refused, on the line the record starts.
        assert_eq!(fields(&rows), vec![(3, Some("name"))]);
        let rows =
            csv("MILK,\"Milk, whole \"\"organic\"\"\",\"4006381333931; 96385074\",piece,reduced,\"false\"\n").unwrap();
        assert_eq!(rows[0].name, "Milk, whole \"organic\"");
        assert_eq!(rows[0].gtins.len(), 2);
        let e = parse_csv(format!("{HEADER}A,\"open,,piece,x,\n").as_bytes()).unwrap_err();
        assert!(e.errors[0].message.contains("not closed"));
        let e = parse_csv(format!("{HEADER}A,\"x\"y,,piece,x,\n").as_bytes()).unwrap_err();
        assert_eq!(e.errors[0].line, 2);
    }

    #[test]
    fn a_bom_and_crlf_line_endings_are_accepted() {
        let text = "\u{feff}sku,name,gtins,unit,tax_class,discontinued\r\nMILK,Milk,96385074,piece,reduced,true\r\n\r\nEGG,Egg,,piece,reduced,0\r\n";
        let rows = parse_csv(text.as_bytes()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].sku.as_str(), "MILK");
        assert!(rows[0].discontinued);
        assert_eq!(rows[1].line, 4, "the blank line is counted");
        assert_eq!(rows[1].tax_class, TaxClass("reduced".into()));
    }

    #[test]
    fn columns_may_come_in_any_order_and_discontinued_may_be_left_out() {
        let rows = parse_csv(b"unit,sku,tax_class,gtins,name\ngram,CHEESE,standard,,Cheese\n").unwrap();
        assert_eq!(rows[0].sku.as_str(), "CHEESE");
        assert!(!rows[0].discontinued);
    }

    #[test]
    fn header_problems_are_reported_on_line_1() {
        let e = parse_csv(b"sku,name,colour,unit,tax_class\nA,A,red,piece,x\n").unwrap_err();
        assert_eq!(fields(&e), vec![(1, None), (1, Some("gtins"))]);
        let e = parse_csv(b"").unwrap_err();
        assert_eq!(e.errors[0].line, 1);
        let e = parse_csv(HEADER.as_bytes()).unwrap_err();
        assert!(e.errors[0].message.contains("no rows"));
    }

    #[test]
    fn every_bad_row_is_listed_up_to_the_cap() {
        let mut body = String::new();
        for i in 0..150 {
            body.push_str(&format!("S{i},Name,123,piece,standard,\n"));
        }
        let e = csv(&body).unwrap_err();
        assert_eq!(e.total, 150);
        assert_eq!(e.errors.len(), MAX_ERRORS);
        assert_eq!(e.errors[99].line, 101);
        let e = csv("A,A,,piece,standard,\nB,B,,piece\n").unwrap_err();
        assert_eq!(fields(&e), vec![(3, None)]);
    }

    #[test]
    fn several_problems_in_one_row_are_all_named() {
        let e = csv("bad sku,,1,box,?,maybe\n").unwrap_err();
        assert_eq!(
            fields(&e),
            vec![
                (2, Some("sku")),
                (2, Some("name")),
                (2, Some("gtins")),
                (2, Some("unit")),
                (2, Some("tax_class")),
                (2, Some("discontinued"))
            ]
        );
    }

    #[test]
    fn an_optional_category_becomes_a_sixth_write_and_a_bad_one_names_its_line() {
        let rows = parse_csv(
            b"sku,name,gtins,unit,tax_class,category\nMILK,Milk,,piece,reduced,dairy\nSALT,Salt,,piece,standard,\n",
        )
        .unwrap();
        assert_eq!(rows[0].category.as_deref(), Some("dairy"));
        assert_eq!(rows[1].category, None);
        let w = writes(&rows);
        assert_eq!(w.len(), 11);
        assert_eq!(w[5].field, CatalogField::Category("dairy".into()));
        let e = parse_csv(b"sku,name,gtins,unit,tax_class,category\nA,A,,piece,x,ok\nB,B,,piece,x,bad category!\n")
            .unwrap_err();
        assert_eq!(fields(&e), vec![(3, Some("category"))]);
        assert!(e.errors[0].message.contains("bad category!"), "{e:?}");
        let good = r#"{"sku":"A","name":"A","unit":"piece","tax_class":"x","category":"food/dairy"}"#;
        let json = format!("[{good},\n{}]", r#"{"sku":"B","name":"B","unit":"piece","tax_class":"x","category":7}"#);
        let e = parse_json(json.as_bytes()).unwrap_err();
        assert_eq!(fields(&e), vec![(2, Some("category"))]);
        let rows = parse_json(format!("[{good}]").as_bytes()).unwrap();
        assert_eq!(rows[0].category.as_deref(), Some("food/dairy"));
    }

    #[test]
    fn invalid_utf8_is_refused_with_its_line() {
        let e = parse_csv(b"sku,name,gtins,unit,tax_class\nA,\xff,,piece,x\n").unwrap_err();
        assert_eq!(e.errors[0].line, 2);
    }

    #[test]
    fn json_rows_report_the_line_their_object_starts_on() {
        let text = r#"[
  {"sku": "MILK", "name": "Milk", "gtins": ["4006381333931"], "unit": "piece", "tax_class": "reduced"},
  {"sku": "BAD",
   "name": "Bad", "gtins": ["4006381333932"], "unit": "piece", "tax_class": "reduced"},
  {"sku": "EGG", "name": "Egg, \"free\" [range]", "gtins": "96385074", "unit": "ounce", "tax_class": "reduced",
   "discontinued": true}
]"#;
        let e = parse_json(text.as_bytes()).unwrap_err();
        assert_eq!(fields(&e), vec![(3, Some("gtins")), (5, Some("unit"))]);
        let good = text
            .replace("4006381333932", "96385074")
            .replace("ounce", "gram")
            .replace("\"gtins\": \"96385074\"", "\"gtins\": []");
        let rows = parse_json(good.as_bytes()).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2].name, "Egg, \"free\" [range]");
        assert!(rows[2].discontinued);
    }

    #[test]
    fn json_shape_errors_are_reported() {
        let e = parse_json(b"{\"sku\": 1}").unwrap_err();
        assert_eq!(e.errors[0].line, 1);
        let e = parse_json(b"[\n{\"sku\": 1}]").unwrap_err();
        assert_eq!(e.errors[0].line, 2);
        assert!(e.errors.iter().any(|r| r.field.as_deref() == Some("sku")));
        let e = parse_json(b"[{\"sku\": \"A\", \"colour\": \"red\"}]").unwrap_err();
        assert_eq!(fields(&e)[0], (1, Some("colour")));
        let e = parse_json(b"[1,\n2").unwrap_err();
        assert_eq!(e.errors[0].line, 2);
        assert!(e.errors[0].message.starts_with("invalid JSON"));
        let e = parse_json(b"[]").unwrap_err();
        assert!(e.errors[0].message.contains("no rows"));
        let rows =
            parse_json(b"\xEF\xBB\xBF[{\"sku\":\"A\",\"name\":\"A\",\"unit\":\"piece\",\"tax_class\":\"x\"}]").unwrap();
        assert_eq!(rows[0].line, 1);
    }
}
