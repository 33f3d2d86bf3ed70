//! Documents from a Parquet file (the Hugging Face datasets' format): one per row, the text in
//! a string column. Read a batch of rows at a time from each row group's column chunk, so
//! memory stays near one page of the column, whatever the file's size.

use std::path::Path;

use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::error::{DataError, Result};

/// Rows read at once from a column chunk.
const BATCH_ROWS: usize = 1024;

/// Calls `f` with the text and number of every row of the top-level string column `column`,
/// in order.
pub(crate) fn rows(
    path: &Path,
    column: &str,
    mut f: impl FnMut(String, u64) -> Result<()>,
) -> Result<()> {
    let err = |message: String| DataError::Parquet {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| {
        err(format!(
            "not a readable Parquet file ({e}); give a .parquet file, or --format text / jsonl"
        ))
    })?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let columns = schema.columns();
    let Some(index) = columns
        .iter()
        .position(|c| c.path().parts() == [column.to_string()])
    else {
        let names: Vec<String> = columns.iter().take(16).map(|c| c.path().string()).collect();
        return Err(err(format!(
            "no top-level column {column:?} (columns: {names:?}); name the text column with \
             --text-key"
        )));
    };
    let descr = &columns[index];
    if descr.physical_type() != PhysicalType::BYTE_ARRAY || descr.max_rep_level() > 0 {
        return Err(err(format!(
            "column {column:?} is {:?}{}, not a string column; name the text column with \
             --text-key",
            descr.physical_type(),
            if descr.max_rep_level() > 0 {
                " (a list)"
            } else {
                ""
            }
        )));
    }
    let max_def = descr.max_def_level();
    let mut row = 0u64;
    let (mut defs, mut values): (Vec<i16>, Vec<ByteArray>) = (Vec::new(), Vec::new());
    for group in 0..reader.num_row_groups() {
        let group_reader = reader
            .get_row_group(group)
            .map_err(|e| err(format!("row group {group}: {e}")))?;
        let ColumnReader::ByteArrayColumnReader(mut column_reader) = group_reader
            .get_column_reader(index)
            .map_err(|e| err(format!("row group {group}: {e}")))?
        else {
            unreachable!("a BYTE_ARRAY column has a byte-array reader");
        };
        loop {
            defs.clear();
            values.clear();
            let (records, _, _) = column_reader
                .read_records(BATCH_ROWS, Some(&mut defs), None, &mut values)
                .map_err(|e| err(format!("row group {group}, after row {row}: {e}")))?;
            if records == 0 {
                break;
            }
            let mut values = values.drain(..);
            // A required column (max_def 0) has no levels: every row has a value.
            let mut row_defs = defs.iter();
            for _ in 0..records {
                if row_defs.next().is_some_and(|&d| d < max_def) {
                    return Err(err(format!(
                        "row {row}: column {column:?} is null; drop or fill the empty rows first"
                    )));
                }
                let value = values.next().expect("one value per non-null row");
                let text = String::from_utf8(value.data().to_vec()).map_err(|e| {
                    err(format!(
                        "row {row}: column {column:?} is not valid UTF-8 at byte {}; is it a \
                         string column?",
                        e.utf8_error().valid_up_to()
                    ))
                })?;
                f(text, row)?;
                row += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use parquet::basic::Compression;
    use parquet::data_type::ByteArrayType;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;

    /// Writes `rows` as a Parquet file with an `id` column and a `text` column (nullable:
    /// `None` is a null), `group_rows` rows per row group, snappy-compressed.
    pub(crate) fn write_parquet(path: &Path, rows: &[Option<&str>], group_rows: usize) {
        let schema = Arc::new(
            parse_message_type("message doc { required int64 id; optional binary text (UTF8); }")
                .unwrap(),
        );
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
        );
        let file = std::fs::File::create(path).unwrap();
        let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
        let mut first = 0i64;
        for group in rows.chunks(group_rows) {
            let mut rg = writer.next_row_group().unwrap();
            let mut col = rg.next_column().unwrap().unwrap();
            let ids: Vec<i64> = (first..first + group.len() as i64).collect();
            col.typed::<parquet::data_type::Int64Type>()
                .write_batch(&ids, None, None)
                .unwrap();
            col.close().unwrap();
            let mut col = rg.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = group.iter().flatten().map(|t| (*t).into()).collect();
            let defs: Vec<i16> = group.iter().map(|t| i16::from(t.is_some())).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&values, Some(&defs), None)
                .unwrap();
            col.close().unwrap();
            rg.close().unwrap();
            first += group.len() as i64;
        }
        writer.close().unwrap();
    }

    fn read(path: &Path, column: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        rows(path, column, |text, row| {
            assert_eq!(row, out.len() as u64);
            out.push(text);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn rows_of_the_text_column_in_order_across_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.parquet");
        let texts: Vec<String> = (0..2500).map(|i| format!("document {i} ✓")).collect();
        let rows_: Vec<Option<&str>> = texts.iter().map(|t| Some(t.as_str())).collect();
        write_parquet(&p, &rows_, 1000);
        assert_eq!(read(&p, "text").unwrap(), texts);
    }

    #[test]
    fn wrong_columns_nulls_and_non_parquet_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.parquet");
        write_parquet(&p, &[Some("a"), None, Some("c")], 10);
        let e = read(&p, "body").unwrap_err().to_string();
        assert!(
            e.contains("no top-level column \"body\"") && e.contains("\"text\""),
            "{e}"
        );
        let e = read(&p, "id").unwrap_err().to_string();
        assert!(e.contains("INT64") && e.contains("--text-key"), "{e}");
        let e = read(&p, "text").unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("null"), "{e}");
        let txt = dir.path().join("t.parquet");
        std::fs::write(&txt, "plain text").unwrap();
        let e = read(&txt, "text").unwrap_err().to_string();
        assert!(
            e.contains("t.parquet") && e.contains("not a readable Parquet"),
            "{e}"
        );
    }
}
