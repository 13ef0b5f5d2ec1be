//! The prompts a teacher-written corpus is sampled from: five kinds of request (instructions,
//! questions, stories, explanations, dialogue), each a handful of templates filled from lists of
//! topics, characters and roles. The training and held-out sets draw from disjoint topics (every
//! fifth topic is held out) and held-out-only templates, so the held-out text is about things the
//! training text never asked for.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which prompts: the training set's or the held-out set's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptSet {
    Train,
    Heldout,
}

/// The kind of request a prompt makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    Instruction,
    Question,
    Story,
    Explanation,
    Dialogue,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Instruction,
        Kind::Question,
        Kind::Story,
        Kind::Explanation,
        Kind::Dialogue,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Instruction => "instruction",
            Kind::Question => "question",
            Kind::Story => "story",
            Kind::Explanation => "explanation",
            Kind::Dialogue => "dialogue",
        }
    }
}

/// One user request.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub kind: Kind,
    pub text: String,
    /// The topic drawn for it (the one a template with a topic names; a second, `{u}`, comes
    /// from the same set).
    pub topic: &'static str,
}

const TOPICS: &[&str] = &[
    "photosynthesis",
    "the water cycle",
    "black holes",
    "the French Revolution",
    "machine learning",
    "climate change",
    "the human heart",
    "volcanoes",
    "the stock market",
    "renewable energy",
    "the Roman Empire",
    "vaccines",
    "plate tectonics",
    "the internet",
    "honey bees",
    "the Moon landing",
    "compound interest",
    "sleep",
    "the immune system",
    "electric cars",
    "ancient Egypt",
    "recycling",
    "the printing press",
    "coral reefs",
    "gravity",
    "inflation",
    "the Silk Road",
    "DNA",
    "earthquakes",
    "solar panels",
    "the Renaissance",
    "bread baking",
    "chess",
    "rainforests",
    "the periodic table",
    "democracy",
    "jazz music",
    "antibiotics",
    "the Industrial Revolution",
    "time management",
    "octopuses",
    "public speaking",
    "the Olympic Games",
    "cloud computing",
    "the Great Wall of China",
    "nutrition",
    "hurricanes",
    "supply and demand",
    "the theory of evolution",
    "meditation",
    "bicycles",
    "the speed of light",
    "volunteering",
    "the Amazon river",
    "cryptography",
    "gardening",
    "the Cold War",
    "friendship",
    "batteries",
    "the solar system",
    "learning a new language",
    "wolves",
    "bridges",
    "the human brain",
    "coffee",
    "tsunamis",
    "personal budgeting",
    "impressionist painting",
    "the printing of money",
    "glaciers",
    "open source software",
    "the Vikings",
    "exercise",
    "magnets",
    "urban planning",
    "deserts",
    "the history of writing",
    "airplanes",
    "fermentation",
    "the ocean floor",
    "elections",
    "spiders",
    "trains",
    "the stars",
    "kindness",
    "video games",
    "mountains",
    "the telephone",
    "tea",
    "migration of birds",
    "databases",
    "the Aztecs",
    "rivers",
    "composting",
    "robots",
    "the Arctic",
    "photography",
    "lighthouses",
    "small businesses",
    "mushrooms",
    "the violin",
    "weather forecasting",
    "the alphabet",
    "pandas",
    "recycling plastic",
    "teamwork",
    "clocks",
    "the Sahara",
    "nuclear energy",
    "cooking rice",
    "dinosaurs",
    "libraries",
    "the human skeleton",
    "wind turbines",
    "ancient Greece",
    "poetry",
    "rainbows",
    "the economy of cities",
    "submarines",
    "elephants",
    "bees and flowers",
    "the printing of books",
    "first aid",
    "telescopes",
    "the history of medicine",
    "saving water",
    "computers",
    "farming",
    "mathematics in daily life",
    "the Pacific Ocean",
    "music festivals",
    "castles",
    "salt",
    "the microscope",
    "whales",
    "habits",
    "space stations",
    "forests",
    "the wheel",
    "money",
    "snow",
    "the post office",
    "fossils",
    "kites",
    "the human eye",
    "sailing",
    "carnivorous plants",
    "the history of chocolate",
    "programming languages",
    "ants",
    "maps",
    "skyscrapers",
];

const CHARACTERS: &[&str] = &[
    "a young inventor",
    "an old fisherman",
    "a curious cat",
    "a lonely robot",
    "a baker in a small town",
    "a girl who could talk to birds",
    "a retired astronaut",
    "a shy dragon",
    "two siblings",
    "a lighthouse keeper",
    "a detective",
    "a farmer",
    "a school teacher",
    "a lost puppy",
    "a musician",
    "a knight",
];

const SITUATIONS: &[&str] = &[
    "finds a mysterious map",
    "must cross a frozen river",
    "loses something precious",
    "makes an unexpected friend",
    "gets lost in a big city",
    "has to solve a puzzle before sunset",
    "discovers a hidden door",
    "learns an important lesson",
    "enters a competition",
    "helps a stranger",
    "travels to a faraway island",
    "wakes up with a strange power",
];

const ROLES: &[(&str, &str)] = &[
    ("a teacher", "a student"),
    ("a doctor", "a patient"),
    ("two friends", ""),
    ("a customer", "a shop assistant"),
    ("a journalist", "a scientist"),
    ("a parent", "a child"),
    ("an interviewer", "a job candidate"),
    ("a tourist", "a local guide"),
];

/// Templates by kind; `{t}` a topic, `{u}` a second topic, `{c}` a character, `{s}` a
/// situation, `{a}`/`{b}` two roles. The last of each list is held-out only.
fn templates(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Instruction => &[
            "Write a short paragraph about {t}.",
            "Give me five interesting facts about {t}.",
            "Write a short guide for beginners about {t}.",
            "Summarize the most important ideas about {t} in a few sentences.",
            "Write a short essay on the pros and cons of {t}.",
            "Write a blog post introduction about {t}.",
            "Make a list of tips related to {t}, with a sentence explaining each.",
            "Write a short encyclopedia entry about {t}.",
        ],
        Kind::Question => &[
            "What is {t}?",
            "Why is {t} important?",
            "How does {t} work?",
            "What are some common misconceptions about {t}?",
            "What should everyone know about {t}?",
            "How has {t} changed over time?",
            "What is the connection between {t} and {u}?",
            "What would the world be like without {t}?",
        ],
        Kind::Story => &[
            "Write a short story about {c} who {s}.",
            "Tell a children's story about {t}.",
            "Write a story that begins: \"It was the coldest morning of the year.\"",
            "Write a short fable about {c} and {t}, with a moral at the end.",
            "Write a short adventure story where {c} {s}.",
            "Write a story told by {c} who {s}.",
        ],
        Kind::Explanation => &[
            "Explain {t} to a beginner.",
            "Explain {t} in simple terms, with an example.",
            "Compare {t} and {u}.",
            "Explain {t} to a ten-year-old.",
            "Describe step by step how {t} works.",
            "Explain the history of {t} briefly.",
            "Explain the main causes and effects of {t}.",
        ],
        Kind::Dialogue => &[
            "Write a dialogue between {a} and {b} about {t}.",
            "Write a conversation in which {a} explains {t} to {b}.",
            "Write a short interview about {t}.",
            "Write a debate between two people who disagree about {t}.",
            "Write a phone call between {a} and {b} about {t}.",
        ],
    }
}

/// The topics of `set` (every fifth is held out).
fn topics(set: PromptSet) -> Vec<&'static str> {
    TOPICS
        .iter()
        .enumerate()
        .filter(|(i, _)| (i % 5 == 4) == (set == PromptSet::Heldout))
        .map(|(_, t)| *t)
        .collect()
}

/// A random prompt of `set`.
pub fn sample(set: PromptSet, rng: &mut StdRng) -> Prompt {
    let kind = Kind::ALL[rng.random_range(0..Kind::ALL.len())];
    let all = templates(kind);
    // The last template of each kind is the held-out set's alone; the held-out set draws from
    // every template, the training set from all but that one.
    let list = match set {
        PromptSet::Train => &all[..all.len() - 1],
        PromptSet::Heldout => all,
    };
    let template = *list.choose(rng).expect("templates are not empty");
    let topics = topics(set);
    let t = *topics.choose(rng).expect("topics are not empty");
    let u = loop {
        let u = *topics.choose(rng).expect("topics are not empty");
        if u != t {
            break u;
        }
    };
    let c = *CHARACTERS.choose(rng).expect("not empty");
    let s = *SITUATIONS.choose(rng).expect("not empty");
    let (a, b) = *ROLES.choose(rng).expect("not empty");
    let (a, b) = if b.is_empty() {
        ("one friend", "another")
    } else {
        (a, b)
    };
    let text = template
        .replace("{t}", t)
        .replace("{u}", u)
        .replace("{c}", c)
        .replace("{s}", s)
        .replace("{a}", a)
        .replace("{b}", b);
    Prompt {
        kind,
        text,
        topic: t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_sets_share_no_topic_and_fill_every_placeholder() {
        let (train, held) = (topics(PromptSet::Train), topics(PromptSet::Heldout));
        assert!(train.iter().all(|t| !held.contains(t)));
        assert_eq!(train.len() + held.len(), TOPICS.len());
        let mut rng = StdRng::seed_from_u64(1);
        let mut kinds = std::collections::HashSet::new();
        for _ in 0..2000 {
            for set in [PromptSet::Train, PromptSet::Heldout] {
                let p = sample(set, &mut rng);
                assert!(!p.text.contains('{'), "{}", p.text);
                kinds.insert(p.kind);
                // Each set asks only about its own topics.
                let own = if set == PromptSet::Train {
                    &train
                } else {
                    &held
                };
                assert!(own.contains(&p.topic), "{set:?}: {}", p.topic);
            }
        }
        assert_eq!(kinds.len(), Kind::ALL.len());
    }

    #[test]
    fn a_seed_gives_the_same_prompts() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50)
                .map(|_| sample(PromptSet::Train, &mut rng).text)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
