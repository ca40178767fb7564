"""Small vocabularies, written for this package, from which the filler text and needle values are made.

Filler words are plain lowercase English without digits. `VALUE_WORDS` (keys and values of word
needles) is kept disjoint from every filler list, so a word needle is not found in generated filler;
the task builder still checks each value against the actual haystack (user text can contain anything).
"""
from __future__ import annotations

NOUNS = (
    "river", "garden", "window", "teacher", "village", "market", "letter", "bridge", "mountain", "harbor",
    "kitchen", "library", "farmer", "painter", "lantern", "meadow", "forest", "station", "student", "doctor",
    "table", "basket", "candle", "ladder", "blanket", "road", "field", "wagon", "school", "tower",
    "orchard", "fountain", "sailor", "baker", "traveler", "stranger", "neighbor", "child", "family", "council",
    "stone", "cloud", "morning", "evening", "winter", "summer", "autumn", "spring", "season", "journey",
    "story", "song", "picture", "message", "question", "answer", "promise", "decision", "problem", "method",
    "machine", "engine", "wheel", "clock", "mirror", "door", "roof", "wall", "floor", "corner",
    "path", "valley", "island", "shore", "lake", "pond", "hill", "cave", "desert", "plain",
    "boat", "ship", "train", "coat", "hat", "boot", "shirt", "scarf", "glove", "pocket",
    "bread", "soup", "cheese", "apple", "pear", "cup", "plate", "bowl", "spoon", "kettle",
    "paper", "pencil", "notebook", "chapter", "page", "word", "sentence", "report", "plan", "map",
    "crowd", "guest", "friend", "brother", "sister", "mother", "father", "uncle", "cousin", "elder",
)

ADJECTIVES = (
    "quiet", "bright", "old", "young", "small", "large", "narrow", "wide", "gentle", "careful",
    "busy", "patient", "curious", "tired", "cheerful", "honest", "simple", "heavy", "light", "warm",
    "cold", "early", "late", "distant", "nearby", "hidden", "open", "empty", "crowded", "silent",
    "green", "brown", "grey", "golden", "pale", "dark", "clean", "dusty", "wooden", "rusty",
    "modest", "proud", "humble", "clever", "polite", "strange", "familiar", "ordinary", "steady", "sudden",
    "round", "flat", "tall", "short", "long", "soft", "rough", "smooth", "plain", "fresh",
)

TRANSITIVE_VERBS = (
    "carried", "painted", "repaired", "visited", "noticed", "followed", "described", "opened", "closed", "cleaned",
    "watched", "found", "kept", "moved", "lifted", "sold", "bought", "measured", "counted", "ordered",
    "studied", "remembered", "forgot", "crossed", "passed", "reached", "built", "filled", "covered", "shared",
    "explained", "planned", "checked", "changed", "wrapped", "packed", "borrowed", "returned", "praised", "greeted",
)

INTRANSITIVE_VERBS = (
    "waited", "rested", "wandered", "smiled", "laughed", "listened", "worked", "stayed", "arrived", "returned",
    "paused", "slept", "walked", "talked", "sang", "hurried", "lingered", "settled", "gathered", "danced",
)

ADVERBS = (
    "slowly", "quickly", "quietly", "carefully", "gladly", "rarely", "often", "again", "together", "alone",
    "easily", "gently", "calmly", "firmly", "kindly", "plainly", "softly", "briefly", "patiently", "eagerly",
)

PREPOSITIONS = (
    "near", "behind", "beside", "across", "under", "above", "inside", "around", "along", "past",
    "beyond", "below", "toward", "within", "among",
)

CONNECTORS = (
    "Later", "Meanwhile", "After a while", "In the end", "At first", "Soon after", "By noon", "That evening",
    "Before long", "Once again", "For a moment", "Every day", "Some time later", "As usual", "Even so",
)

# Invented given names, made of syllables that spell no common word.
NAMES = (
    "Talen", "Mirsa", "Odrin", "Velia", "Corvan", "Ilsa", "Brenno", "Amira", "Dovel", "Senna",
    "Harlo", "Petra", "Quillan", "Rosalin", "Tomas", "Yveline", "Marek", "Lunet", "Edric", "Fenna",
)

# Keys and values of word needles; disjoint from all filler lists above.
VALUE_WORDS = (
    "zebra", "violin", "pelican", "saffron", "tangerine", "walrus", "cobalt", "juniper", "mosaic", "falcon",
    "cinnamon", "glacier", "lobster", "marble", "nectar", "octopus", "papaya", "quartz", "raccoon", "sapphire",
    "tornado", "umbrella", "vulture", "walnut", "yogurt", "zeppelin", "avocado", "bamboo", "cactus", "dolphin",
    "emerald", "flamingo", "giraffe", "hazelnut", "iguana", "jasmine", "kangaroo", "lemonade", "mango", "nutmeg",
    "ostrich", "penguin", "quokka", "rhubarb", "squirrel", "tulip", "unicorn", "vanilla", "wombat", "xylophone",
    "yak", "zucchini", "anchovy", "buffalo", "coconut", "dragonfly", "eggplant", "ferret", "gorilla", "hyacinth",
)

FILLER_LISTS = (NOUNS, ADJECTIVES, TRANSITIVE_VERBS, INTRANSITIVE_VERBS, ADVERBS, PREPOSITIONS, CONNECTORS, NAMES)
