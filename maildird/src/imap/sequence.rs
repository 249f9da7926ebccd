//! Sequence sets (RFC 9051 9 `sequence-set`) resolved against a mailbox,
//! and the compact form used in COPYUID and ESEARCH.

use imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};

/// A sequence set with `*` replaced by the largest number in use.
#[derive(Debug, Clone)]
pub struct NumberSet {
    ranges: Vec<(u32, u32)>,
}

impl NumberSet {
    /// Resolve `set`; `largest` is the highest sequence number or UID in
    /// the mailbox (0 when empty). `n:*` always takes in the largest,
    /// even when n is above it (RFC 9051 6.4.8).
    pub fn resolve(set: &SequenceSet, largest: u32) -> NumberSet {
        let value = |s: &SeqOrUid| match s {
            SeqOrUid::Value(n) => n.get(),
            SeqOrUid::Asterisk => largest,
        };
        let ranges = set
            .0
            .as_ref()
            .iter()
            .map(|s| match s {
                Sequence::Single(a) => (value(a), value(a)),
                Sequence::Range(a, b) => {
                    let (a, b) = (value(a), value(b));
                    (a.min(b), a.max(b))
                }
            })
            .collect();
        NumberSet { ranges }
    }

    /// Whether `n` is in the set.
    pub fn contains(&self, n: u32) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= n && n <= b)
    }

    /// Whether the set names a number above `largest` (for sequence
    /// numbers, an error: RFC 9051 6.4.8 allows only existing ones).
    pub fn exceeds(&self, largest: u32) -> bool {
        self.ranges.iter().any(|&(_, b)| b > largest)
    }
}

/// Numbers in compact form, `1:3,5` (in the order given, runs joined).
pub fn compact(numbers: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < numbers.len() {
        let start = numbers[i];
        let mut end = start;
        while i + 1 < numbers.len() && numbers[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = numbers[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::decode::Decoder;

    fn set(s: &str) -> SequenceSet {
        // Parse through a whole command, as the server does.
        let cmd = format!("a FETCH {s} FLAGS\r\n");
        let (_, c) = imap_codec::CommandCodec::default()
            .decode(cmd.as_bytes())
            .unwrap();
        match c.body {
            imap_types::command::CommandBody::Fetch { sequence_set, .. } => {
                imap_types::IntoStatic::into_static(sequence_set)
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn resolves_asterisk() {
        let s = NumberSet::resolve(&set("5:*"), 3);
        assert!(s.contains(3) && s.contains(4) && !s.contains(2));
        let s = NumberSet::resolve(&set("1,3:4,*"), 9);
        assert!(s.contains(1) && !s.contains(2) && s.contains(9));
        assert!(s.exceeds(8));
    }

    #[test]
    fn compacts() {
        assert_eq!(compact(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(compact(&[4, 2]), "4,2");
        assert_eq!(compact(&[]), "");
    }
}
