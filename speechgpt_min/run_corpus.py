"""What a run of train.py reads, checked once: the corpus directory and the units the run made of it.

    corpus = Corpus(args, settings)       # manifest.jsonl and qa.jsonl checked before any work
    corpus.rows, corpus.pairs             # utterances, question/answer pairs
    corpus.units(), corpus.n_units()      # units.jsonl, after the units step wrote it
    corpus.text_corpus(), corpus.fact_statements()   # stage 0's text; the fact statements replayed later
    corpus.sentences(split, voice), corpus.spoken_questions(...), corpus.typed_questions(split)

A mistake in the command line or the inputs is a UserError: train.py prints it as one line. Every
step raises it (speech_steps.py, lm_stages.py), so it lives here, below them all.
"""
from speechgpt_min.data import DataError, check_corpus, load_fact_statements, load_text_corpus
from speechgpt_min.units import read_run_units


class UserError(Exception):
    """A mistake in the command line or the inputs: printed as one line, without a traceback."""


class Corpus:
    """The corpus directory, checked once: manifest rows, question/answer pairs, and what the run made of them."""

    def __init__(self, args, settings):
        try:
            self.rows, self.pairs = check_corpus(args.data)
        except DataError as error:
            raise UserError(f"{error} (expected a corpus directory like tiny_data/)") from None
        self.data, self.run, self.settings = args.data, args.out, settings
        self.by_id = {r["id"]: r for r in self.rows}
        self._read_units = None

    def text_corpus(self):
        try:
            return load_text_corpus(self.data / "text_corpus.txt")
        except DataError as error:
            raise UserError(f"{error}; or skip stage 0 with --no-text-pretraining") from None

    def fact_statements(self):
        """The lines of the text corpus that state the world's facts (facts.jsonl's "statements"), which
        stages 2 and 3 replay; a corpus without facts.jsonl replays every line of its text corpus."""
        path = self.data / "facts.jsonl"
        if not path.is_file():
            return self.text_corpus()
        try:
            return load_fact_statements(path)
        except DataError as error:
            raise UserError(str(error)) from None

    def n_units(self):
        """K, the unit vocabulary: the phone recogniser's phones, or the k-means size."""
        return self._units()[2]

    def units(self, field="units"):
        """{utterance id: its deduplicated units} (or their durations, field="durations") from units.jsonl."""
        return self._units()[0 if field == "units" else 1]

    def _units(self):
        """units.jsonl, read once (after the units step wrote it)."""
        if self._read_units is None:
            if not (self.run / "units.jsonl").is_file():
                raise UserError(f"{self.run}/units.jsonl: no units yet; run the units step first "
                                f"(python train.py --stage units)")
            self._read_units = read_run_units(self.run)
        return self._read_units

    def sentences(self, split, answer_voice):
        """Read sentences of a split: (the other voices' readings, the answer voice's)."""
        rows = [r for r in self.rows if r["split"] == split and r.get("kind", "sent") == "sent"]
        return [r for r in rows if r["voice"] != answer_voice], [r for r in rows if r["voice"] == answer_voice]

    def spoken_questions(self, pair_split, audio_split, units):
        """(question units, question text, answer text, answer units) of the pairs of a split whose
        question audio is in `audio_split` (a held-out voice's recordings are in test_unseen_voice)."""
        return [(units[qid], p["question"]["text"], p["answer"]["text"], units[p["answer"]["audio"][0]])
                for p in self._pairs(pair_split, ())
                for qid in p["question"]["audio"] if self.by_id[qid]["split"] == audio_split]

    def typed_questions(self, pair_split, but_skills=()):
        return [(p["question"]["text"], p["answer"]["text"]) for p in self._pairs(pair_split, but_skills)]

    def _pairs(self, split, but_skills):
        return [p for p in self.pairs if p["split"] == split and p.get("skill") not in but_skills]
