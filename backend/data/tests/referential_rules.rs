//! Hand-written edge cases for the referential extension (Algorithm 1 with the authors'
//! defects fixed): subject/object/possessive forms, groups in any order, Oxford comma,
//! capitalisation, empty frames, set changes, multi-word names and user pronouns.

use std::collections::BTreeMap;

use data::{make_referential, RuleSet, StoryFrame};

fn flint(frames: &[(&str, &[&str])]) -> Vec<String> {
    let frames: Vec<StoryFrame> = frames
        .iter()
        .map(|(c, ch)| StoryFrame::new(c, ch))
        .collect();
    make_referential(&RuleSet::flintstones(), &frames)
}

fn pororo(captions: &[&str]) -> Vec<String> {
    let frames: Vec<StoryFrame> = captions
        .iter()
        .map(|c| StoryFrame {
            caption: c.to_string(),
            characters: None,
        })
        .collect();
    make_referential(&RuleSet::pororo(), &frames)
}

#[test]
fn single_character_subject_object_possessive() {
    let out = flint(&[
        ("Wilma is in the kitchen.", &["wilma"]),
        ("Wilma picks up a plate.", &["wilma"]),
        ("The dog runs to Wilma and barks at Wilma.", &["wilma"]),
        ("Wilma's hat falls, so Wilma laughs.", &["wilma"]),
    ]);
    assert_eq!(out[0], "Wilma is in the kitchen.");
    assert_eq!(out[1], "She picks up a plate.");
    assert_eq!(out[2], "The dog runs to her and barks at her.");
    assert_eq!(out[3], "Her hat falls, so she laughs.");
}

#[test]
fn gender_follows_the_character_not_always_he() {
    let out = flint(&[
        ("Fred sits.", &["Fred"]),
        ("Fred stands up.", &["Fred"]),
        ("Betty waves.", &["Betty"]),
        ("Betty smiles at the camera.", &["Betty"]),
    ]);
    assert_eq!(out[1], "He stands up.");
    assert_eq!(out[2], "Betty waves.");
    assert_eq!(out[3], "She smiles at the camera.");
}

#[test]
fn verbs_make_objects() {
    let out = flint(&[
        ("Dino runs.", &["dino"]),
        ("A bird follows Dino.", &["dino"]),
    ]);
    assert_eq!(out[1], "A bird follows him.");
}

#[test]
fn two_characters_either_order() {
    let out = flint(&[
        ("Fred and Barney are bowling.", &["fred", "barney"]),
        ("Barney and Fred cheer loudly.", &["fred", "barney"]),
        (
            "Wilma talks to Fred and Barney.",
            &["wilma", "fred", "barney"],
        ),
    ]);
    assert_eq!(out[1], "They cheer loudly.");
    assert_eq!(out[2], "Wilma talks to Fred and Barney.");
}

#[test]
fn three_characters_any_order_with_or_without_oxford_comma() {
    let set: &[&str] = &["fred", "wilma", "pebbles"];
    let out = flint(&[
        ("Fred, Wilma and Pebbles eat dinner.", set),
        ("Pebbles, Fred, and Wilma laugh.", set),
        ("The cat looks at Wilma, Pebbles and Fred.", set),
        ("Fred, Wilma and Pebbles's house is quiet.", set),
    ]);
    assert_eq!(out[1], "They laugh.");
    assert_eq!(out[2], "The cat looks at them.");
    assert_eq!(out[3], "Their house is quiet.");
}

#[test]
fn group_possessive_and_object() {
    let out = flint(&[
        ("Betty and Wilma sit.", &["betty", "wilma"]),
        ("A man gives Wilma and Betty a gift.", &["betty", "wilma"]),
        ("Wilma and Betty's car is red.", &["betty", "wilma"]),
    ]);
    assert_eq!(out[1], "A man gives them a gift.");
    assert_eq!(out[2], "Their car is red.");
}

#[test]
fn capitalised_only_at_sentence_start() {
    let out = flint(&[
        ("Barney drinks.", &["barney"]),
        ("It is late. Barney yawns, and Barney sleeps.", &["barney"]),
    ]);
    assert_eq!(out[1], "It is late. He yawns, and he sleeps.");
}

#[test]
fn frames_without_characters_are_fine_and_reset() {
    let out = flint(&[
        ("Fred walks.", &["fred"]),
        ("The room is empty.", &[]),
        ("Fred comes back.", &["fred"]),
        ("Fred sits down.", &["fred"]),
    ]);
    assert_eq!(
        out,
        vec![
            "Fred walks.",
            "The room is empty.",
            "Fred comes back.",
            "He sits down."
        ]
    );
    let only_empty = flint(&[("A rock.", &[]), ("Another rock.", &[])]);
    assert_eq!(only_empty, vec!["A rock.", "Another rock."]);
}

#[test]
fn a_different_set_resets_the_immediate_set() {
    let out = flint(&[
        ("Fred and Wilma talk.", &["fred", "wilma"]),
        ("Fred leaves.", &["fred"]),
        ("Fred and Wilma hug.", &["fred", "wilma"]),
        ("Fred eats.", &["fred"]),
        ("Fred burps.", &["fred"]),
    ]);
    assert_eq!(
        out,
        vec![
            "Fred and Wilma talk.",
            "Fred leaves.",
            "Fred and Wilma hug.",
            "Fred eats.",
            "He burps."
        ]
    );
}

#[test]
fn mr_slate_dotted_and_possessive() {
    let out = flint(&[
        ("Mr. Slate is angry.", &["slate"]),
        ("Mr. Slate shouts at the workers.", &["slate"]),
        ("Fred looks at Mr Slate's desk.", &["slate", "fred"]),
        ("Mr Slate fires Fred.", &["slate", "fred"]),
    ]);
    assert_eq!(out[1], "He shouts at the workers.");
    assert_eq!(out[3], "Mr Slate fires Fred.");
    let out = flint(&[
        ("Mr Slate sits.", &["Mr Slate"]),
        ("Fred's boss Mr Slate's car honks.", &["mr. slate"]),
    ]);
    assert_eq!(out[1], "Fred's boss his car honks.");
}

#[test]
fn fred_possessive() {
    let out = flint(&[
        ("Fred is home.", &["fred"]),
        ("Fred's dinner is ready.", &["fred"]),
    ]);
    assert_eq!(out[1], "His dinner is ready.");
}

#[test]
fn unlabelled_frames_use_caption_names() {
    let frames = vec![
        StoryFrame {
            caption: "Barney naps.".into(),
            characters: None,
        },
        StoryFrame {
            caption: "Barney snores.".into(),
            characters: None,
        },
    ];
    assert_eq!(
        make_referential(&RuleSet::flintstones(), &frames)[1],
        "He snores."
    );
}

#[test]
fn user_given_they_and_it() {
    let mut p = BTreeMap::new();
    p.insert("Robo".to_string(), "it".to_string());
    p.insert("Sam".to_string(), "they".to_string());
    p.insert("Ada Lovelace".to_string(), "she/her".to_string());
    let rules = RuleSet::custom(&p).unwrap();
    let f = |c: &str, ch: &[&str]| StoryFrame::new(c, ch);
    let out = make_referential(
        &rules,
        &[
            f("Robo beeps.", &["Robo"]),
            f("Robo's light blinks and Robo rolls to the door.", &["Robo"]),
            f("Sam opens the door.", &["Sam"]),
            f("Sam waves at Robo.", &["Sam"]),
            f("Ada Lovelace reads.", &["Ada Lovelace"]),
            f("The cat sits on Ada Lovelace.", &["Ada Lovelace"]),
        ],
    );
    assert_eq!(out[1], "Its light blinks and it rolls to the door.");
    // A singular "they" subject takes the plural verb form.
    assert_eq!(out[3], "They wave at Robo.");
    assert_eq!(out[5], "The cat sits on her.");
}

#[test]
fn unknown_custom_characters_become_they() {
    let rules = RuleSet::custom(&BTreeMap::new()).unwrap();
    let out = make_referential(
        &rules,
        &[
            StoryFrame::new("Kim runs.", &["Kim"]),
            StoryFrame::new("Kim stops.", &["Kim"]),
        ],
    );
    assert_eq!(out[1], "They stop.");
}

#[test]
fn singular_they_subject_agrees_with_its_verb() {
    let mut p = BTreeMap::new();
    p.insert("Alex".to_string(), "they".to_string());
    let rules = RuleSet::custom(&p).unwrap();
    let story = [
        "Alex enters.",
        "Alex is happy and Alex watches the sky.",
        "Alex quickly fixes the car, then Alex cries.",
        "Alex has a kite. Alex goes home.",
        "Alex kisses the dog and the dog licks Alex.",
        "Alex walked home.",
    ];
    let frames: Vec<StoryFrame> = story
        .iter()
        .map(|c| StoryFrame::new(c, &["Alex"]))
        .collect();
    let out = make_referential(&rules, &frames);
    assert_eq!(out[1], "They are happy and they watch the sky.");
    assert_eq!(out[2], "They quickly fix the car, then they cry.");
    assert_eq!(out[3], "They have a kite. They go home.");
    assert_eq!(out[4], "They kiss the dog and the dog licks them.");
    assert_eq!(out[5], "They walked home.");
}

#[test]
fn pororo_single_immediate_character() {
    let out = pororo(&[
        "Loopy is baking.",
        "Loopy puts a cake on the table.",
        "Pororo comes in.",
        "Pororo eats the cake.",
    ]);
    assert_eq!(
        out,
        vec![
            "Loopy is baking.",
            "She puts a cake on the table.",
            "Pororo comes in.",
            "He eats the cake."
        ]
    );
}

#[test]
fn pororo_they_prefix_rule() {
    let out = pororo(&[
        "Pororo and Crong are playing in the snow.",
        "Crong and Pororo make a snowman.",
        "Pororo, Crong and Eddy are skiing.",
        "Eddy, Pororo, and Crong fall down. Eddy laughs.",
    ]);
    assert_eq!(out[1], "They make a snowman.");
    assert_eq!(out[2], "Pororo, Crong and Eddy are skiing.");
    assert_eq!(out[3], "They fall down. Eddy laughs.");
}

#[test]
fn pororo_last_sentence_picks_the_immediate_character() {
    let out = pororo(&["Poby meets Harry. Harry sings.", "Harry dances."]);
    assert_eq!(out[1], "He dances.");
}
