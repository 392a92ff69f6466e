//! The metadata file of a saved stream: its format is the store's [module doc](super)'s
//! "Metadata" section.

use std::fmt::Write as _;

use super::key::HistoryEntry;

/// The metadata file's name inside a stream's directory.
pub(crate) const FILE: &str = "stream.meta";

/// The format's first line, without the version.
const MAGIC: &str = "shmexec-stream";

/// The version this code writes and the only one it reads.
pub(crate) const VERSION: u32 = 1;

/// One chunk of a saved stream, as its metadata describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    pub(crate) file: String,
    pub(crate) len: u64,
    pub(crate) checksum: blake3::Hash,
    pub(crate) range: Option<(i64, i64)>,
}

impl ChunkInfo {
    /// The chunk file's name inside the stream's directory.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The chunk's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the chunk is empty (0 bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blake3 hash of the chunk's bytes, in hex.
    pub fn checksum(&self) -> String {
        self.checksum.to_hex().to_string()
    }

    /// The chunk's time range `[start, end)`, if it was given one.
    pub fn range(&self) -> Option<(i64, i64)> {
        self.range
    }
}

/// Everything a stream's metadata file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) history: Vec<HistoryEntry>,
    pub(crate) chunks: Vec<ChunkInfo>,
}

impl Meta {
    /// The file's text.
    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{MAGIC} {VERSION}");
        let _ = writeln!(s, "id {}", self.id);
        let _ = writeln!(s, "name {}", escape(&self.name));
        let _ = writeln!(s, "version {}", escape(&self.version));
        let _ = writeln!(s, "history {}", self.history.len());
        for h in &self.history {
            let (name, version) = (escape(&h.name), escape(&h.version));
            let _ = writeln!(s, "stage {} {name} {version}", h.id);
        }
        let _ = writeln!(s, "chunks {}", self.chunks.len());
        for c in &self.chunks {
            let _ = write!(s, "chunk {} {} {} ", c.file, c.len, c.checksum.to_hex());
            let _ = match c.range {
                Some((start, end)) => writeln!(s, "{start} {end}"),
                None => writeln!(s, "- -"),
            };
        }
        s.push_str("end\n");
        s
    }

    /// Parses a file's text.
    pub(crate) fn parse(text: &str) -> Result<Meta, Bad> {
        let mut lines = Lines {
            lines: text.split('\n'),
            n: 0,
        };
        let version = lines.field(MAGIC)?;
        if version != VERSION.to_string() {
            return Err((
                1,
                format!("format version {version:?}; this build reads version {VERSION}"),
            ));
        }
        let id = lines.field("id")?;
        if !is_id(id) {
            return Err((lines.n, format!("{id:?} is not an id (64 hex digits)")));
        }
        let id = id.to_owned();
        let name = unescape(lines.field("name")?).map_err(|e| (lines.n, e))?;
        let version = unescape(lines.field("version")?).map_err(|e| (lines.n, e))?;

        let n = lines.count("history")?;
        let mut history = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let [id, name, version] = lines.fields::<3>("stage")?;
            if !is_id(id) {
                return Err((lines.n, format!("{id:?} is not an id (64 hex digits)")));
            }
            history.push(HistoryEntry {
                id: id.to_owned(),
                name: unescape(name).map_err(|e| (lines.n, e))?,
                version: unescape(version).map_err(|e| (lines.n, e))?,
            });
        }

        let n = lines.count("chunks")?;
        let mut chunks = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let [file, len, checksum, start, end] = lines.fields::<5>("chunk")?;
            if !is_file_name(file) {
                return Err((lines.n, format!("{file:?} is not a chunk file's name")));
            }
            let len = len
                .parse()
                .map_err(|_| (lines.n, format!("length {len:?} is not a number")))?;
            let checksum = blake3::Hash::from_hex(checksum).map_err(|_| {
                (
                    lines.n,
                    format!("checksum {checksum:?} is not 64 hex digits"),
                )
            })?;
            let range = match (start, end) {
                ("-", "-") => None,
                (start, end) => match (start.parse(), end.parse()) {
                    (Ok(s), Ok(e)) => Some((s, e)),
                    _ => {
                        return Err((
                            lines.n,
                            format!("time range {start:?} {end:?} is neither two integers nor - -"),
                        ));
                    }
                },
            };
            chunks.push(ChunkInfo {
                file: file.to_owned(),
                len,
                checksum,
                range,
            });
        }

        lines.line("end")?;
        // The text after the end line's break: nothing.
        if lines.lines.next() != Some("") || lines.lines.next().is_some() {
            return Err((
                lines.n,
                "the end line is not the file's last, or has no line break".into(),
            ));
        }
        Ok(Meta {
            id,
            name,
            version,
            history,
            chunks,
        })
    }
}

/// Where a metadata file is wrong (its line, from 1) and what is wrong there.
pub(crate) type Bad = (usize, String);

/// The lines of a metadata file, with the number of the last one taken.
struct Lines<'a> {
    lines: std::str::Split<'a, char>,
    n: usize,
}

impl<'a> Lines<'a> {
    fn next(&mut self, keyword: &str) -> Result<&'a str, Bad> {
        self.n += 1;
        match self.lines.next() {
            Some(line) if !(line.is_empty() && self.lines.clone().next().is_none()) => Ok(line),
            _ => Err((
                self.n,
                format!("the file ends where a {keyword:?} line should be"),
            )),
        }
    }

    /// A line that is exactly `keyword`.
    fn line(&mut self, keyword: &str) -> Result<(), Bad> {
        match self.next(keyword)? {
            line if line == keyword => Ok(()),
            line => Err((self.n, format!("expected {keyword:?}, found {line:?}"))),
        }
    }

    /// The `N` fields after `keyword`.
    fn fields<const N: usize>(&mut self, keyword: &str) -> Result<[&'a str; N], Bad> {
        let line = self.next(keyword)?;
        let mut parts = line.split(' ');
        if parts.next() != Some(keyword) {
            return Err((
                self.n,
                format!("expected a {keyword:?} line, found {line:?}"),
            ));
        }
        let fields: Vec<&str> = parts.collect();
        fields.try_into().map_err(|fields: Vec<&str>| {
            (
                self.n,
                format!(
                    "a {keyword:?} line has {N} fields, this one has {}: {line:?}",
                    fields.len()
                ),
            )
        })
    }

    fn field(&mut self, keyword: &str) -> Result<&'a str, Bad> {
        Ok(self.fields::<1>(keyword)?[0])
    }

    fn count(&mut self, keyword: &str) -> Result<usize, Bad> {
        let n = self.field(keyword)?;
        n.parse()
            .map_err(|_| (self.n, format!("{keyword} count {n:?} is not a number")))
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A plain name inside the stream's directory: no separator, no `..`, nothing hidden.
fn is_file_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Percent-encodes every byte outside `!`..=`~`, and `%`.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The string [`escape`] made `s` from.
pub(crate) fn unescape(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{s:?} has a % not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} decodes to bytes that are not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Meta {
        Meta {
            id: "ab".repeat(32),
            name: "peaks with spaces %20 and\nlines".into(),
            version: String::new(),
            history: vec![
                HistoryEntry {
                    name: "raw records ä".into(),
                    version: "1".into(),
                    id: "0f".repeat(32),
                },
                HistoryEntry {
                    name: "peaks with spaces %20 and\nlines".into(),
                    version: String::new(),
                    id: "ab".repeat(32),
                },
            ],
            chunks: vec![
                ChunkInfo {
                    file: "000000.rkyv".into(),
                    len: 4104,
                    checksum: blake3::hash(b"one"),
                    range: Some((-5, 1000)),
                },
                ChunkInfo {
                    file: "000001.rkyv".into(),
                    len: 0,
                    checksum: blake3::hash(b""),
                    range: None,
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let meta = sample();
        let text = meta.render();
        assert_eq!(text.lines().count(), 1 + 4 + 2 + 1 + 2 + 1);
        assert!(!text.contains("ä"), "{text}");
        assert_eq!(Meta::parse(&text).unwrap(), meta);
        let empty = Meta {
            history: vec![],
            chunks: vec![],
            ..meta
        };
        assert_eq!(Meta::parse(&empty.render()).unwrap(), empty);
    }

    #[test]
    fn strings_round_trip() {
        for s in ["", " ", "%", "%2", "a b\tc\r\nd", "ünïcödé", "-", "plain"] {
            let e = escape(s);
            assert!(!e.contains(' ') && !e.contains('\n'));
            assert_eq!(unescape(&e).unwrap(), s);
        }
        assert!(unescape("%zz").is_err());
        assert!(unescape("%4").is_err());
        assert!(unescape("%FF").is_err());
    }

    #[test]
    fn a_file_cut_short_does_not_parse() {
        let text = sample().render();
        for cut in 0..text.len() {
            if text.is_char_boundary(cut) {
                assert!(Meta::parse(&text[..cut]).is_err(), "parsed at {cut}");
            }
        }
    }

    #[test]
    fn damage_is_an_error_with_its_line() {
        let text = sample().render();
        let bad = text.replace("shmexec-stream 1", "shmexec-stream 2");
        assert_eq!(Meta::parse(&bad).unwrap_err().0, 1);
        let bad = text.replace("chunk 000000.rkyv 4104", "chunk ../etc 4104");
        assert_eq!(Meta::parse(&bad).unwrap_err().0, 9);
        let bad = text.replace(" 4104 ", " 41x4 ");
        assert_eq!(Meta::parse(&bad).unwrap_err().0, 9);
        let bad = text.replace(" - -", " - 7");
        assert_eq!(Meta::parse(&bad).unwrap_err().0, 10);
        let bad = format!("{text}more\n");
        assert_eq!(Meta::parse(&bad).unwrap_err().0, 11);
        let bad = text.replace("history 2", "history 3");
        assert!(Meta::parse(&bad).is_err());
    }
}
