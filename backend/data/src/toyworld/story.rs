//! Toy stories: who is in each frame, where they stand, where the story happens, and a
//! caption from a small grammar (actions, objects, places, conjunctions, possessives).
//! Characters and places recur across a story's frames the way they do in a real story.

use rand::seq::SliceRandom;
use rand::Rng;

use super::cast::CAST;
use super::scenes::SCENES;
use crate::rules::Case;

/// One character placed in a frame (all lengths are fractions of the frame size).
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Index into the cast.
    pub character: usize,
    /// Horizontal centre of the feet.
    pub cx: f32,
    /// Vertical position of the feet.
    pub feet: f32,
    /// Adult height before the character's own scale.
    pub height: f32,
    /// Facing left.
    pub flip: bool,
}

/// One frame of a toy story.
#[derive(Debug, Clone, PartialEq)]
pub struct ToyFrame {
    /// Index into the scenes.
    pub scene: usize,
    /// Background mirrored.
    pub flip_bg: bool,
    /// Characters, drawn in this order (back to front).
    pub placements: Vec<Placement>,
    /// Original caption.
    pub caption: String,
}

/// A toy story.
#[derive(Debug, Clone, PartialEq)]
pub struct ToyStory {
    /// Frames in order.
    pub frames: Vec<ToyFrame>,
}

type Verb = (&'static str, &'static str, &'static str);

const INTRANSITIVE: &[Verb] = &[
    ("walks", "walk", "walking"),
    ("runs", "run", "running"),
    ("jumps", "jump", "jumping"),
    ("laughs", "laugh", "laughing"),
    ("dances", "dance", "dancing"),
    ("sings", "sing", "singing"),
    ("waits", "wait", "waiting"),
    ("smiles", "smile", "smiling"),
    ("sits down", "sit down", "sitting down"),
    ("looks around", "look around", "looking around"),
    ("waves", "wave", "waving"),
    ("rests", "rest", "resting"),
];
const WITH_OBJECT: &[Verb] = &[
    ("holds", "hold", "holding"),
    ("carries", "carry", "carrying"),
    ("drops", "drop", "dropping"),
    ("finds", "find", "finding"),
    ("throws", "throw", "throwing"),
    ("picks up", "pick up", "picking up"),
    ("looks at", "look at", "looking at"),
];
const SOCIAL: &[Verb] = &[
    ("talks to", "talk to", "talking to"),
    ("waves at", "wave at", "waving at"),
    ("looks at", "look at", "looking at"),
    ("follows", "follow", "following"),
    ("hugs", "hug", "hugging"),
    ("smiles at", "smile at", "smiling at"),
    ("points at", "point at", "pointing at"),
    ("runs after", "run after", "running after"),
    ("listens to", "listen to", "listening to"),
    ("helps", "help", "helping"),
    ("calls", "call", "calling"),
];
const OBJECTS: &[&str] = &[
    "a red ball",
    "a cup of tea",
    "a big rock",
    "a newspaper",
    "a bowling ball",
    "a sandwich",
    "a kite",
    "a flower",
    "a book",
    "an umbrella",
    "a drum",
    "a basket of apples",
];
const OPENERS: &[&str] = &["Then", "Later", "Suddenly", "Meanwhile", "Now"];
const ACCESSORY_EVENTS: &[(&str, &str)] = &[
    ("looks shiny", "look shiny"),
    ("gets dirty", "get dirty"),
    ("is crooked", "are crooked"),
    ("gets wet", "get wet"),
    ("catches the light", "catch the light"),
];

fn pick<'a, T, R: Rng>(rng: &mut R, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// Caption for a frame whose characters are `who` (shown in that order) in `scene`.
fn caption<R: Rng>(
    rng: &mut R,
    who: &[usize],
    scene: usize,
    objects: &[&'static str; 2],
) -> String {
    let n: Vec<&str> = who.iter().map(|&i| CAST[i].name).collect();
    let place = SCENES[scene].phrase;
    let obj = if rng.gen_bool(0.7) {
        objects[rng.gen_range(0..2)]
    } else {
        *pick(rng, OBJECTS)
    };
    let iv = *pick(rng, INTRANSITIVE);
    let iv2 = *pick(rng, INTRANSITIVE);
    let tv = *pick(rng, WITH_OBJECT);
    let sv = *pick(rng, SOCIAL);
    let opener = *pick(rng, OPENERS);
    match n.len() {
        1 => {
            let a = n[0];
            let pron = CAST[who[0]].pronoun.word(Case::Subject);
            match rng.gen_range(0..8) {
                0 => format!("{a} {} {place}.", iv.0),
                1 => format!("{a} {} {obj} {place}.", tv.0),
                2 => format!("{}, {a} {}.", cap(place), iv.0),
                3 => format!("{a} is {} {place}.", iv.2),
                4 => format!("{a} {} {obj} and {pron} {}.", tv.0, iv.0),
                5 => format!("{opener} {a} {}.", iv.0),
                6 => {
                    // "glasses" is plural.
                    let acc = CAST[who[0]].accessory;
                    let ev = pick(rng, ACCESSORY_EVENTS);
                    format!(
                        "{a}'s {acc} {}.",
                        if acc == "glasses" { ev.1 } else { ev.0 }
                    )
                }
                _ => format!("{a} {} with {obj}.", iv.0),
            }
        }
        2 => {
            let (a, b) = (n[0], n[1]);
            match rng.gen_range(0..8) {
                0 => format!("{a} and {b} {} {place}.", iv.1),
                1 => format!("{a} {} {b} {place}.", sv.0),
                2 => format!("{a} looks at {b}'s {}.", CAST[who[1]].accessory),
                3 => format!("{a} {} while {b} {}.", iv.0, iv2.0),
                4 => format!("{a} gives {b} {obj}."),
                5 => format!("{a} and {b} are {} together.", iv.2),
                6 => format!("{}, {a} and {b} {} {obj}.", cap(place), tv.1),
                _ => format!("{a} {} {b}. {b} {}.", sv.0, iv.0),
            }
        }
        _ => {
            let (a, b, c) = (n[0], n[1], n[2]);
            match rng.gen_range(0..6) {
                0 => format!("{a}, {b} and {c} {} {place}.", iv.1),
                1 => format!("{a}, {b}, and {c} are {} together.", iv.2),
                2 => format!("{a} and {b} {} {c}.", sv.1),
                3 => format!("{a} {} {b} and {c} {}.", sv.0, iv.0),
                4 => format!("{a} shows {obj} to {b} and {c}."),
                _ => format!("{opener} {a}, {b} and {c} {}.", iv.1),
            }
        }
    }
}

fn random_subset<R: Rng>(rng: &mut R, cast: &[usize]) -> Vec<usize> {
    let k = match rng.gen_range(0..10) {
        0..=4 => 1,
        5..=8 => 2,
        _ => 3,
    }
    .min(cast.len());
    let mut s: Vec<usize> = cast.choose_multiple(rng, k).copied().collect();
    s.sort_unstable();
    s
}

/// Place characters left to right in slots, with varied sizes (smaller = further back).
fn place<R: Rng>(rng: &mut R, chars: &[usize], scene: usize) -> Vec<Placement> {
    let mut order = chars.to_vec();
    order.shuffle(rng);
    let n = order.len() as f32;
    let horizon = SCENES[scene].horizon;
    let mut out: Vec<Placement> = order
        .iter()
        .enumerate()
        .map(|(slot, &c)| {
            let depth: f32 = rng.gen_range(0.0..1.0);
            let height = 0.4 + 0.24 * depth;
            let feet = (horizon + 0.1 + (0.98 - horizon - 0.1) * depth).min(0.98);
            let (l, r) = CAST[c].extent;
            let w = height * CAST[c].scale;
            let lo = (slot as f32 / n).max(-l * w + 0.01);
            let hi = ((slot as f32 + 1.0) / n).min(1.0 - r * w - 0.01);
            let centre = (slot as f32 + 0.5) / n;
            let cx = if hi > lo {
                rng.gen_range(lo..hi) * 0.6 + centre * 0.4
            } else {
                centre
            };
            Placement {
                character: c,
                cx,
                feet,
                height,
                flip: rng.gen_bool(0.5),
            }
        })
        .collect();
    out.sort_by(|a, b| a.feet.total_cmp(&b.feet));
    out
}

/// Sample one story of `len` frames.
pub fn sample_story<R: Rng>(rng: &mut R, len: usize) -> ToyStory {
    let cast_size = match rng.gen_range(0..10) {
        0..=2 => 2,
        3..=7 => 3,
        _ => 4,
    };
    let all: Vec<usize> = (0..CAST.len()).collect();
    let cast: Vec<usize> = all.choose_multiple(rng, cast_size).copied().collect();
    let mut scene = rng.gen_range(0..SCENES.len());
    let switch_at = if rng.gen_bool(0.35) {
        rng.gen_range(2..len.max(3))
    } else {
        usize::MAX
    };
    let flip_bg = rng.gen_bool(0.5);
    let objects = [*pick(rng, OBJECTS), *pick(rng, OBJECTS)];
    let mut frames: Vec<ToyFrame> = Vec::with_capacity(len);
    let mut current = random_subset(rng, &cast);
    for i in 0..len {
        if i == switch_at {
            scene = (scene + rng.gen_range(1..SCENES.len())) % SCENES.len();
        }
        if i > 0 {
            let roll: f32 = rng.gen();
            if roll < 0.2 {
                // Someone joins or leaves.
                let outside: Vec<usize> = cast
                    .iter()
                    .copied()
                    .filter(|c| !current.contains(c))
                    .collect();
                if (current.len() < 3 && !outside.is_empty() && rng.gen_bool(0.5))
                    || current.len() == 1
                {
                    if let Some(&c) = outside.choose(rng) {
                        current.push(c);
                    }
                } else {
                    current.remove(rng.gen_range(0..current.len()));
                }
                current.sort_unstable();
            } else if roll >= 0.7 {
                current = random_subset(rng, &cast);
            }
        }
        let mut named = current.clone();
        named.shuffle(rng);
        let caption = caption(rng, &named, scene, &objects);
        frames.push(ToyFrame {
            scene,
            flip_bg,
            placements: place(rng, &current, scene),
            caption,
        });
    }
    ToyStory { frames }
}
