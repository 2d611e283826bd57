//! Grouping corpus documents whose content is identical.
//!
//! Converted datasets can contain distinct items that read exactly alike:
//! WordNet has several synsets consisting only of the word "bank", so the
//! item text "bank (noun)" occurs more than once. A retriever cannot tell
//! such items apart, so counting one of them as a miss when the judged item
//! is its twin would measure the dataset, not the model. Evaluators use
//! these groups to treat every member of a group as the same answer.

use std::collections::HashMap;

use super::Dataset;

impl Dataset {
    /// Maps every corpus index to its group's canonical index: the first
    /// document (in corpus order) with the same title and text. Documents
    /// without a twin map to themselves.
    pub fn duplicate_text_groups(&self) -> HashMap<u32, u32> {
        let mut first: HashMap<(&str, &str), u32> = HashMap::with_capacity(self.corpus.len());
        let mut groups = HashMap::with_capacity(self.corpus.len());
        // Qrel stores document indices as u32, so a corpus never has more;
        // zipping with a u32 range avoids a lossy cast.
        for (index, doc) in (0u32..).zip(&self.corpus) {
            let canonical = *first.entry((doc.title.as_str(), doc.text.as_str())).or_insert(index);
            groups.insert(index, canonical);
        }
        groups
    }

    /// How many corpus documents repeat the title and text of an earlier
    /// one (the number of non-canonical entries in
    /// [`duplicate_text_groups`](Self::duplicate_text_groups)).
    pub fn identical_text_count(&self) -> usize {
        self.duplicate_text_groups().iter().filter(|(index, canonical)| index != canonical).count()
    }
}
