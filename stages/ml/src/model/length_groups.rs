//! Length-sorted groups of rows, so that a batch is embedded with little
//! padding while it stays one batch (same rows, same in-batch negatives).

/// Rows of the given token `lengths` in groups: sorted by length, each group
/// as long as its padding stays at most `max_padding` of its padded tokens.
/// Every row is in exactly one group; `max_padding >= 1` gives one group.
pub fn length_groups(lengths: &[usize], max_padding: f64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut real = 0usize;
    for i in order {
        let longest = lengths[i];
        if let Some(group) = groups.last_mut() {
            // Sorted: the new row is the group's longest.
            let padded = longest * (group.len() + 1);
            let padding = padded - (real + longest);
            if padding as f64 <= max_padding * padded as f64 {
                group.push(i);
                real += longest;
                continue;
            }
        }
        groups.push(vec![i]);
        real = longest;
    }
    groups
}

/// Padding share of `groups` padded to their longest row.
pub fn padding_share(lengths: &[usize], groups: &[Vec<usize>]) -> f64 {
    let (mut real, mut padded) = (0usize, 0usize);
    for group in groups {
        let longest = group.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        padded += longest * group.len();
        real += group.iter().map(|&i| lengths[i]).sum::<usize>();
    }
    if padded == 0 {
        0.0
    } else {
        (padded - real) as f64 / padded as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_once_and_padding_within_budget() {
        let mut state = 7u64;
        let lengths: Vec<usize> = (0..64)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                12 + (state >> 33) as usize % 117
            })
            .collect();
        let groups = length_groups(&lengths, 0.1);
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..64).collect::<Vec<_>>());
        assert!(padding_share(&lengths, &groups) <= 0.1);
        assert!(groups.len() > 1 && groups.len() < 32, "{}", groups.len());
        // One padded batch wastes far more.
        let one = vec![(0..64).collect::<Vec<_>>()];
        assert!(padding_share(&lengths, &one) > 0.3);
        assert_eq!(length_groups(&lengths, 1.0).len(), 1);
    }
}
