//! Terms and term histories.
//!
//! A term is one proposer's reign. The term history of a WAL says which term wrote which part:
//! entry `(term, lsn)` means WAL from `lsn` up to the next entry's `lsn` (or the end of the WAL)
//! was written by the proposer of `term`. Entries are ordered by strictly increasing term and
//! non-decreasing LSN; a term that wrote nothing has a zero-length range.

use std::fmt;

use serde::{Deserialize, Serialize};
use utils::Lsn;

pub type Term = u64;

/// Most entries a term history may hold on the wire or on disk (one per election: generous).
pub const MAX_TERM_HISTORY_ENTRIES: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermLsn {
    pub term: Term,
    pub lsn: Lsn,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermHistory(pub Vec<TermLsn>);

impl fmt::Display for TermHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}@{}", e.term, e.lsn)?;
        }
        f.write_str("]")
    }
}

impl TermHistory {
    pub fn empty() -> Self {
        TermHistory(Vec::new())
    }

    pub fn last(&self) -> Option<TermLsn> {
        self.0.last().copied()
    }

    /// Checks the ordering rules; the error says which entry breaks them.
    pub fn validate(&self) -> Result<(), String> {
        if self.0.len() > MAX_TERM_HISTORY_ENTRIES {
            return Err(format!("term history has {} entries, more than {MAX_TERM_HISTORY_ENTRIES}", self.0.len()));
        }
        for w in self.0.windows(2) {
            if w[1].term <= w[0].term {
                return Err(format!("term history {self}: term {} follows term {}", w[1].term, w[0].term));
            }
            if w[1].lsn < w[0].lsn {
                return Err(format!(
                    "term history {self}: term {} starts at {} before term {} at {}",
                    w[1].term, w[1].lsn, w[0].term, w[0].lsn
                ));
            }
        }
        Ok(())
    }

    /// The term that wrote the last byte before `flush_lsn`, or rather, in the convention the
    /// election uses: the term of the last entry starting at or below `flush_lsn`. An acceptor
    /// that adopted term T's history at exactly T's start counts as having T's (empty) log, so
    /// it beats acceptors whose longer WAL is from older terms. 0 when nothing applies.
    pub fn last_log_term(&self, flush_lsn: Lsn) -> Term {
        self.0.iter().rev().find(|e| e.lsn <= flush_lsn).map_or(0, |e| e.term)
    }

    /// The entries starting at or below `lsn`: the history of the WAL prefix ending at `lsn`.
    pub fn up_to(&self, lsn: Lsn) -> TermHistory {
        TermHistory(self.0.iter().copied().filter(|e| e.lsn <= lsn).collect())
    }

    /// Where the WAL of an acceptor (history `acc`, WAL ending at `acc_flush_lsn`) stops agreeing
    /// with the WAL described by `self` (a proposer's history): the highest LSN up to which both
    /// were written by the same terms. `None` when they share no term at all.
    pub fn highest_common_point(&self, acc: &TermHistory, acc_flush_lsn: Lsn) -> Option<Lsn> {
        let mut last_common = None;
        for (i, (p, a)) in self.0.iter().zip(acc.0.iter()).enumerate() {
            if p.term != a.term {
                break;
            }
            if p.lsn != a.lsn {
                // The same term cannot start at two places; treat the term as divergent.
                return if i == 0 { None } else { Some(p.lsn.min(a.lsn).min(acc_flush_lsn)) };
            }
            last_common = Some(i);
        }
        let i = last_common?;
        let prop_end = self.0.get(i + 1).map_or(Lsn::MAX, |e| e.lsn);
        let acc_end = acc.0.get(i + 1).map_or(acc_flush_lsn, |e| e.lsn.min(acc_flush_lsn));
        Some(prop_end.min(acc_end))
    }

    /// The term that wrote the byte at `lsn`, per this history (None below the first entry).
    pub fn term_at(&self, lsn: Lsn) -> Option<Term> {
        // The last entry whose range [start, next start) contains lsn; zero-length ranges
        // contain nothing, so take the last entry with start <= lsn.
        self.0.iter().rev().find(|e| e.lsn <= lsn).map(|e| e.term)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn th(v: &[(u64, u64)]) -> TermHistory {
        TermHistory(v.iter().map(|&(term, lsn)| TermLsn { term, lsn: Lsn(lsn) }).collect())
    }

    #[test]
    fn validate_rules() {
        assert!(th(&[(1, 0), (2, 100), (3, 100)]).validate().is_ok());
        assert!(th(&[(2, 0), (1, 100)]).validate().is_err());
        assert!(th(&[(1, 100), (2, 50)]).validate().is_err());
    }

    #[test]
    fn last_log_term_counts_adopted_empty_term() {
        let h = th(&[(1, 0), (2, 100)]);
        assert_eq!(h.last_log_term(Lsn(50)), 1);
        assert_eq!(h.last_log_term(Lsn(100)), 2);
        assert_eq!(th(&[]).last_log_term(Lsn(10)), 0);
    }

    #[test]
    fn common_point() {
        let prop = th(&[(1, 0), (3, 80)]);
        // Acceptor lagging inside term 1.
        assert_eq!(prop.highest_common_point(&th(&[(1, 0)]), Lsn(50)), Some(Lsn(50)));
        // Acceptor ahead in term 1 beyond where term 3 started: cut at 80.
        assert_eq!(prop.highest_common_point(&th(&[(1, 0)]), Lsn(120)), Some(Lsn(80)));
        // Acceptor with a term-2 tail the proposer never saw: cut where term 2 began.
        assert_eq!(prop.highest_common_point(&th(&[(1, 0), (2, 60)]), Lsn(90)), Some(Lsn(60)));
        // Acceptor that adopted term 2's history while lagging: its WAL is term 1 up to 50.
        assert_eq!(prop.highest_common_point(&th(&[(1, 0), (2, 100)]), Lsn(50)), Some(Lsn(50)));
        // Same term as the proposer: everything it has is good.
        assert_eq!(prop.highest_common_point(&th(&[(1, 0), (3, 80)]), Lsn(200)), Some(Lsn(200)));
        // Nothing in common.
        assert_eq!(prop.highest_common_point(&th(&[(2, 0)]), Lsn(10)), None);
        assert_eq!(prop.highest_common_point(&th(&[]), Lsn(0)), None);
    }
}
