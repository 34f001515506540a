//! Byte offsets (what the TOML parser reports) to 1-based line and column
//! numbers (what a person looks for in an editor).

use std::ops::Range;

/// The start of every line of a text, for turning byte offsets into
/// positions in `O(log lines)`.
#[derive(Debug, Clone)]
pub struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset at which each line starts; the first entry is 0.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    /// Indexes `text`. Lines end at `\n` (a preceding `\r` belongs to the
    /// line and is never pointed at by the parser).
    pub fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { text, starts }
    }

    /// The 1-based `(line, column)` of a byte offset; the column counts
    /// characters, not bytes. Offsets past the end point just after the last
    /// character; offsets inside a multi-byte character point at it.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // The last line starting at or before `offset`; `starts[0] == 0`
        // guarantees there is one.
        let line = self.starts.partition_point(|&s| s <= offset) - 1;
        let start = self.starts[line];
        let col = self.text[start..]
            .char_indices()
            .take_while(|&(i, _)| start + i < offset)
            .count();
        (line + 1, col + 1)
    }

    /// The position of the start of a span.
    pub fn start(&self, span: &Range<usize>) -> (usize, usize) {
        self.position(span.start)
    }

    /// The 1-based line on which a span starts.
    pub fn line(&self, span: &Range<usize>) -> usize {
        self.start(span).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_character_is_line_1_column_1() {
        let idx = LineIndex::new("a = 1\n");
        assert_eq!(idx.position(0), (1, 1));
        assert_eq!(idx.position(4), (1, 5));
    }

    #[test]
    fn lines_start_after_each_newline() {
        let text = "[gateway]\nid = \"x\"\n\n  port = 1\n";
        let idx = LineIndex::new(text);
        assert_eq!(idx.position(text.find("id").unwrap()), (2, 1));
        assert_eq!(idx.position(text.find("\"x\"").unwrap()), (2, 6));
        assert_eq!(idx.position(text.find("port").unwrap()), (4, 3));
        // The newline itself belongs to the line it ends.
        assert_eq!(idx.position(9), (1, 10));
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let text = "unit = \"°C\" # ünïcode\nx = 1";
        let idx = LineIndex::new(text);
        assert_eq!(idx.position(text.find('#').unwrap()), (1, 13));
        assert_eq!(idx.position(text.find('x').unwrap()), (2, 1));
    }

    #[test]
    fn crlf_line_endings_and_out_of_range_offsets() {
        let text = "a = 1\r\nb = 2";
        let idx = LineIndex::new(text);
        assert_eq!(idx.position(text.find('b').unwrap()), (2, 1));
        assert_eq!(idx.position(1000), (2, 6));
        assert_eq!(LineIndex::new("").position(0), (1, 1));
    }
}
