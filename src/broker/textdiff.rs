//! Line diffs for people (tool definitions under review, the loaded policy against the file on
//! disk): ` ` same, `-` only in the old text, `+` only in the new one.
//!
//! What runs here: the caller's thread. The common head and tail are set aside first, then the
//! rest is compared by longest common subsequence, bounded by [`MAX_CELLS`] (a diff too large
//! for that is refused rather than allowed to take the memory of a small appliance).

/// Largest middle part compared (lines of old × lines of new): 4 MiB of table.
pub const MAX_CELLS: usize = 1 << 20;

/// The diff of `a` (old) and `b` (new); `None` when the differing middle is too large.
pub fn lines(a: &[&str], b: &[&str]) -> Option<Vec<String>> {
    let head = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let tail = a[head..].iter().rev().zip(b[head..].iter().rev()).take_while(|(x, y)| x == y).count();
    let (ma, mb) = (&a[head..a.len() - tail], &b[head..b.len() - tail]);
    let (n, m) = (ma.len(), mb.len());
    if (n + 1).saturating_mul(m + 1) > MAX_CELLS {
        return None;
    }
    let mut out: Vec<String> = a[..head].iter().map(|l| format!("  {l}")).collect();
    let w = m + 1;
    let mut lcs = vec![0u32; (n + 1) * w];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i * w + j] = if ma[i] == mb[j] {
                lcs[(i + 1) * w + j + 1] + 1
            } else {
                lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && ma[i] == mb[j] {
            out.push(format!("  {}", ma[i]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i * w + j + 1] >= lcs[(i + 1) * w + j]) {
            out.push(format!("+ {}", mb[j]));
            j += 1;
        } else {
            out.push(format!("- {}", ma[i]));
            i += 1;
        }
    }
    out.extend(a[a.len() - tail..].iter().map(|l| format!("  {l}")));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_changes_and_keeps_context() {
        let d = lines(&["a", "b", "c", "d"], &["a", "x", "c", "d", "e"]).unwrap();
        assert_eq!(d, ["  a", "+ x", "- b", "  c", "  d", "+ e"]);
        assert_eq!(lines(&["same"], &["same"]).unwrap(), ["  same"]);
    }

    #[test]
    fn refuses_a_huge_middle() {
        let a: Vec<String> = (0..2000).map(|i| format!("a{i}")).collect();
        let b: Vec<String> = (0..2000).map(|i| format!("b{i}")).collect();
        let (a, b): (Vec<&str>, Vec<&str>) =
            (a.iter().map(String::as_str).collect(), b.iter().map(String::as_str).collect());
        assert!(lines(&a, &b).is_none());
    }
}
