"""Voice-assistant utterances from templates with large slot lists.

`make_utterance(split, index, seed)` is a pure function of its arguments: the same triple always
gives the same text, context and template, whatever process or order it is called in.

Text is normalized to `ALPHABET` (lowercase letters, apostrophe, space; numbers spelled out). A
template whose rendering leaves that alphabet is a build-time `ValueError` naming the template.

Person names come from list-based first/last names and from a syllable generator. Every name
word is assigned to the training or the held-out partition by a hash (`_heldout_word`); training
utterances only use training-partition words, while validation and test utterances use held-out
words in `NOVEL_NAME_FRACTION` of their names, so those names never occur in the training split.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import numpy as np

ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz' ")
SPLITS = ("train", "validation", "test")
NOVEL_NAME_FRACTION = 0.2  # of names in validation/test built from held-out name words

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

FIRST_NAMES = """james mary robert patricia john jennifer michael linda david elizabeth william
barbara richard susan joseph jessica thomas sarah charles karen christopher lisa daniel nancy
matthew betty anthony sandra mark margaret donald ashley steven kimberly andrew emily paul donna
joshua michelle kenneth carol kevin amanda brian melissa george deborah timothy stephanie ronald
rebecca jason sharon edward laura jeffrey cynthia ryan dorothy jacob amy gary kathleen nicholas
angela eric shirley jonathan emma stephen brenda larry pamela justin nicole scott anna brandon
samantha benjamin katherine samuel christine gregory debra alexander rachel patrick carolyn frank
janet raymond maria jack olivia dennis heather jerry helen tyler catherine aaron diane jose julie
adam victoria nathan joyce henry lauren zachary kelly douglas christina peter ruth kyle joan noah
virginia ethan judith jeremy evelyn walter hannah christian andrea keith megan roger cheryl terry
jacqueline austin madison sean teresa gerald abigail carl sophia harold martha dylan sara arthur
gloria lawrence janice jordan kathryn jesse ann bryan isabella billy judy bruce charlotte gabriel
julia joe grace logan amber alan alice juan jean albert denise willie frances elijah danielle
wayne marilyn randy beverly vincent natalie mason diana roy brittany ralph doris bobby kayla
russell alexis bradley lori philip tiffany eugene rose""".split()

LAST_NAMES = """smith johnson williams brown jones garcia miller davis rodriguez martinez
hernandez lopez gonzalez wilson anderson thomas taylor moore jackson martin lee perez thompson
white harris sanchez clark ramirez lewis robinson walker young allen king wright scott torres
nguyen hill flores green adams nelson baker hall rivera campbell mitchell carter roberts gomez
phillips evans turner diaz parker cruz edwards collins reyes stewart morris morales murphy cook
rogers gutierrez ortiz morgan cooper peterson bailey reed kelly howard ramos kim cox ward
richardson watson brooks chavez wood james bennett gray mendoza ruiz hughes price alvarez
castillo sanders patel myers long ross foster jimenez powell jenkins perry russell sullivan bell
coleman butler henderson barnes gonzales fisher vasquez simmons romero jordan patterson alexander
hamilton graham reynolds griffin wallace moreno west cole hayes bryant herrera gibson ellis tran
medina aguilar stevens murray ford castro marshall owens harrison fernandez mcdonald woods
washington kennedy wells vargas henry chen freeman webb tucker guzman burns crawford olson
simpson porter hunter gordon mendez silva shaw snyder mason dixon munoz hunt hicks holmes palmer
wagner black robertson boyd rose stone salazar fox warren mills meyer rice schmidt garza daniels
ferguson nichols stephens soto weaver ryan gardner payne grant dunn kelley spencer hawkins arnold
pierce hansen peters santos hart bradley knight elliott cunningham duncan armstrong
hudson""".split()

_ONSETS = "b br ch d dr f g gr h j k kl l m n p pr r s sh st t tr v w z".split()
_VOWELS = "a e i o u a e o ai ee oo ou".split()
_CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "nd", "rt", "x", "th"]

ROOMS = """kitchen bedroom bathroom living_room dining_room office garage hallway basement
attic nursery guest_room laundry_room porch patio garden study playroom den closet pantry
master_bedroom front_room back_yard driveway staircase loft sunroom workshop""".split()
DEVICES = """lights lamp fan heater air_conditioner tv speaker radio blinds curtains thermostat
dishwasher oven coffee_maker kettle vacuum humidifier dehumidifier projector fireplace
sprinklers doorbell camera plug ceiling_light night_light stereo printer router
washing_machine""".split()
CITIES = """london paris berlin madrid rome lisbon dublin amsterdam brussels vienna prague warsaw
budapest athens istanbul cairo nairobi lagos accra johannesburg cape_town tokyo osaka seoul
beijing shanghai hong_kong singapore bangkok hanoi manila jakarta sydney melbourne brisbane
perth auckland wellington toronto montreal vancouver calgary ottawa boston chicago denver seattle
portland austin dallas houston phoenix atlanta miami orlando detroit cleveland pittsburgh
philadelphia baltimore nashville memphis new_orleans san_diego los_angeles san_francisco
sacramento salt_lake_city las_vegas minneapolis milwaukee st_louis kansas_city omaha
mexico_city lima bogota santiago buenos_aires sao_paulo rio_de_janeiro havana
reykjavik oslo stockholm helsinki copenhagen edinburgh glasgow cardiff belfast manchester
liverpool leeds bristol oxford cambridge zurich geneva munich hamburg frankfurt milan naples
barcelona seville valencia marseille lyon nice krakow bucharest sofia kyiv riga tallinn vilnius
mumbai delhi chennai kolkata karachi dubai doha tehran baghdad riyadh casablanca tunis""".split()
ADJECTIVES = """blue golden silent broken wild lonely electric quiet burning endless hidden
midnight summer winter little crazy sweet bitter distant shining secret heavy velvet paper
northern southern empty perfect lost frozen gentle restless""".split()
NOUNS = """river heart night road fire rain dream city ocean moon star light sky song storm
garden mirror window shadow train highway island mountain letter kingdom echo wave desert
thunder angel stranger""".split()
GENRES = "jazz rock pop classical country blues hip_hop reggae folk soul disco metal".split()
TASKS = (
    "buy milk,call the dentist,take out the trash,water the plants,pick up the kids,"
    "feed the cat,pay the rent,book a table,check the mail,charge my phone,walk the dog,"
    "pack my bag,lock the back door,send the invoice,stretch"
).split(",")
ITEMS = """eggs bread milk butter apples bananas coffee rice pasta cheese tomatoes onions soap
paper_towels orange_juice chicken yogurt cereal""".split()
COUNTABLE = "eggs apples bananas lemons onions tomatoes bagels candles batteries".split()
DAYS = ["today", "tomorrow", "tonight", "this weekend"] + [
    f"on {d}day" for d in "mon tues wednes thurs fri satur sun".split()
]


def number_words(n: int) -> str:
    """Spell out 0 <= n < 1000 in words ("one hundred and five", "twenty five")."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words supports 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    head = _ONES[hundreds] + " hundred"
    return head if rest == 0 else f"{head} and {number_words(rest)}"


def clock_words(hour: int, minute: int) -> str:
    """A spoken clock time: "seven", "seven o'clock", "seven thirty", "seven oh five"."""
    h = _ONES[hour] if hour < 20 else number_words(hour)
    if minute == 0:
        return h + " o'clock"
    if minute < 10:
        return f"{h} oh {_ONES[minute]}"
    return f"{h} {number_words(minute)}"


def _heldout_word(word: str) -> bool:
    """Deterministic ~1/5 partition of name words into the held-out set."""
    return zlib.crc32(word.encode()) % 5 == 0


_TRAIN_FIRST = [w for w in FIRST_NAMES if not _heldout_word(w)]
_HELD_FIRST = [w for w in FIRST_NAMES if _heldout_word(w)]
_TRAIN_LAST = [w for w in LAST_NAMES if not _heldout_word(w)]
_HELD_LAST = [w for w in LAST_NAMES if _heldout_word(w)]


def _syllable_word(rng: np.random.Generator, heldout: bool) -> str:
    while True:
        n = int(rng.integers(2, 4))
        word = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(n))
        word += str(rng.choice(_CODAS))
        if _heldout_word(word) == heldout:
            return word


def person_name(rng: np.random.Generator, heldout: bool) -> str:
    """A first + last name whose words are all in the training or all in the held-out partition."""
    kind = rng.random()
    if kind < 0.75:  # list-based first and last
        first = str(rng.choice(_HELD_FIRST if heldout else _TRAIN_FIRST))
        last = str(rng.choice(_HELD_LAST if heldout else _TRAIN_LAST))
    elif kind < 0.92:  # list first name, generated surname
        first = str(rng.choice(_HELD_FIRST if heldout else _TRAIN_FIRST))
        last = _syllable_word(rng, heldout)
    else:  # fully generated
        first, last = _syllable_word(rng, heldout), _syllable_word(rng, heldout)
    return f"{first} {last}"


@dataclasses.dataclass(frozen=True)
class Utterance:
    text: str
    template: str
    context: tuple[str, ...]  # the speaker's contact and device names (biasing list)
    name: str  # the contact or device phrase spoken, "" if none


def _pick(rng, items) -> str:
    return str(items[int(rng.integers(len(items)))]).replace("_", " ")


def _slots(rng: np.random.Generator, split: str) -> dict[str, str]:
    """Fill every slot once; templates use the ones they name."""
    novel = split != "train" and rng.random() < NOVEL_NAME_FRACTION
    minutes = int(
        rng.choice([1, 2, 3, 5, 10, 15, 20, 25, 30, 45, 90])
        if rng.random() < 0.5
        else rng.integers(1, 100)
    )
    hour = int(rng.integers(1, 13))
    minute = int(
        rng.choice([0, 0, 5, 10, 15, 20, 30, 30, 45, 50])
        if rng.random() < 0.6
        else rng.integers(0, 60)
    )
    adjective, noun = _pick(rng, ADJECTIVES), _pick(rng, NOUNS)
    song = [
        f"{adjective} {noun}",
        f"the {noun}",
        f"{noun} of the {_pick(rng, NOUNS)}",
        f"{adjective} {noun}s",
    ][int(rng.integers(4))]
    artist = (
        person_name(rng, novel)
        if rng.random() < 0.3
        else f"the {_pick(rng, ADJECTIVES)} {_pick(rng, NOUNS)}s"
    )
    return {
        "name": person_name(rng, novel),
        "room": _pick(rng, ROOMS),
        "device": _pick(rng, DEVICES),
        "city": _pick(rng, CITIES),
        "day": _pick(rng, DAYS),
        "song": song,
        "artist": artist,
        "genre": _pick(rng, GENRES),
        "task": _pick(rng, TASKS),
        "item": _pick(rng, ITEMS),
        "things": _pick(rng, COUNTABLE),
        "minutes": number_words(minutes) + (" minute" if minutes == 1 else " minutes"),
        "hours": number_words(hour) + (" hour" if hour == 1 else " hours"),
        "time": clock_words(hour, minute),
        "percent": number_words(int(rng.integers(0, 21)) * 5),
        "degrees": number_words(int(rng.integers(55, 86))),
        "volume": number_words(int(rng.integers(0, 11))),
        "count": number_words(int(rng.integers(2, 13))),
        "late": number_words(int(rng.integers(2, 31))),
    }


# (template name, pattern, weight). Slots in braces; `name` and `room`/`device` feed the context.
TEMPLATES: tuple[tuple[str, str, float], ...] = (
    ("device_on", "turn on the {room} {device}", 3.0),
    ("device_off", "turn off the {room} {device}", 3.0),
    ("device_switch", "switch {onoff} the {device} in the {room}", 1.5),
    ("dim", "dim the {room} lights to {percent} percent", 1.0),
    ("thermostat", "set the thermostat to {degrees} degrees", 1.0),
    ("volume", "set the volume to {volume}", 0.8),
    ("play_song", "play {song} by {artist}", 1.5),
    ("play_artist", "play some music by {artist}", 1.0),
    ("play_genre", "play some {genre} music in the {room}", 1.0),
    ("weather", "what's the weather in {city} {day}", 2.0),
    ("weather_q", "will it rain in {city} {day}", 1.0),
    ("travel", "how long does it take to drive to {city}", 0.8),
    ("timer", "set a timer for {minutes}", 2.0),
    ("timer_hours", "set a timer for {hours} and {minutes}", 0.8),
    ("alarm", "wake me up at {time}", 1.5),
    ("alarm_set", "set an alarm for {time} {day}", 1.2),
    ("remind", "remind me to {task} at {time}", 1.5),
    ("shopping", "add {item} to my shopping list", 1.0),
    ("call", "call {name}", 1.5),
    ("call_speaker", "call {name} on speaker", 0.5),
    ("message", "message {name}", 0.6),
    ("message_late", "text {name} that i'm running {late} minutes late", 1.0),
    ("message_home", "send a message to {name} saying i'll be home at {time}", 0.8),
    ("count", "add {count} {things} to my shopping list", 0.6),
)
_WEIGHTS = np.array([w for _, _, w in TEMPLATES]) / sum(w for _, _, w in TEMPLATES)
_SLOT_RE = re.compile(r"{(\w+)}")


def normalize(text: str, template: str) -> str:
    """Collapse whitespace and check the alphabet; raise naming the template otherwise."""
    text = " ".join(text.lower().split())
    bad = sorted(set(text) - ALPHABET)
    if bad or not text:
        raise ValueError(
            f"template {template!r} produced text outside the alphabet (characters {bad}): {text!r}"
        )
    return text


def split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def make_utterance(split: str, index: int, seed: int, templates=TEMPLATES) -> Utterance:
    """The `index`-th utterance of `split` for `seed` (deterministic)."""
    rng = np.random.default_rng([seed, split_code(split), index, 0x6772])
    weights = _WEIGHTS if templates is TEMPLATES else None
    name, pattern, _ = templates[int(rng.choice(len(templates), p=weights))]
    slots = _slots(rng, split)
    slots["onoff"] = "on" if rng.random() < 0.5 else "off"
    used = set(_SLOT_RE.findall(pattern))
    text = normalize(pattern.format(**slots), name)
    spoken = ""
    if "name" in used:
        spoken = slots["name"]
    elif "room" in used and "device" in used:
        spoken = f"{slots['room']} {slots['device']}"
    novel = split != "train" and rng.random() < NOVEL_NAME_FRACTION
    contacts = [person_name(rng, novel) for _ in range(int(rng.integers(3, 6)))]
    devices = [f"{_pick(rng, ROOMS)} {_pick(rng, DEVICES)}" for _ in range(int(rng.integers(1, 4)))]
    context = [c for c in contacts + devices if c != spoken]
    if spoken:
        context.insert(int(rng.integers(len(context) + 1)), spoken)
    return Utterance(text=text, template=name, context=tuple(context), name=spoken)
