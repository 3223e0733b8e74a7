//! A small seeded generator (splitmix64): the same seed draws the same faults, targets
//! and delays, so a failing run can be replayed. No crate needed for this much.

use std::time::Duration;

/// splitmix64 (Steele, Lea, Flood 2014): 64-bit state, passes BigCrush, one line.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for picking faults.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// An index into a slice of `len`.
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// A duration in `0..max`, to the millisecond.
    pub fn duration(&mut self, max: Duration) -> Duration {
        Duration::from_millis(self.below(max.as_millis() as u64))
    }

    /// Shuffles `items` (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }
}

/// Draws from `items` in shuffled rounds: every item once per round, so that a run of
/// `k * items.len()` draws covers every item `k` times, in a seeded order.
#[derive(Debug, Clone)]
pub struct Deck<T: Clone> {
    items: Vec<T>,
    round: Vec<T>,
}

impl<T: Clone> Deck<T> {
    /// A deck of `items` (an item listed twice is drawn twice per round).
    pub fn new(items: Vec<T>) -> Deck<T> {
        Deck { items, round: Vec::new() }
    }

    /// The next item, or `None` for an empty deck.
    pub fn draw(&mut self, rng: &mut Rng) -> Option<T> {
        if self.round.is_empty() {
            self.round = self.items.clone();
            rng.shuffle(&mut self.round);
        }
        self.round.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_and_a_deck_covers_every_item_per_round() {
        let (mut a, mut b) = (Rng::new(1), Rng::new(1));
        let xs: Vec<u64> = (0..8).map(|_| a.below(100)).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.below(100)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 100));
        let mut deck = Deck::new(vec![1, 2, 3]);
        let mut rng = Rng::new(7);
        let mut round: Vec<i32> = (0..3).filter_map(|_| deck.draw(&mut rng)).collect();
        round.sort_unstable();
        assert_eq!(round, vec![1, 2, 3]);
        assert_eq!(Deck::<u8>::new(vec![]).draw(&mut rng), None);
    }
}
