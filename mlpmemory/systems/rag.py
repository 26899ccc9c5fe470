"""The base LM + in-context retrieval: BM25 passages of the memory's own corpus put before the prompt."""

from __future__ import annotations

from . import ScoredByOwnPass


class RAGSystem(ScoredByOwnPass):
    name = "rag"
    label = "+ RAG (in-context)"
    component = "rag"
    transforms_prompt = True
    scored_by = "rag.cached_ralm_logprobs"

    def __init__(self, retriever=None, n_passages: int = 3, template: str | None = None, scored: dict | None = None):
        """``retriever``: a :class:`mlpmemory.rag.BM25Retriever`; ``template``: a format string with
        ``{passages}`` and ``{prompt}`` (default :func:`mlpmemory.rag.rag_prompt`); ``scored``: eval-ppl's
        ``{"logprob": (N,) log-probs of the test tokens, **fields}`` (from ``cached_ralm_logprobs``)."""
        self.retriever, self.n_passages, self.template, self.scored = retriever, int(n_passages), template, scored

    @classmethod
    def load(cls, run, n_passages: int = 3, rag_template: str | None = None, **options) -> RAGSystem:
        from ..rag import BM25Retriever

        return cls(BM25Retriever.build_or_load(run), n_passages, rag_template)

    @classmethod
    def from_components(cls, rag: dict | None = None, **components):
        return cls(scored=rag) if rag is not None else None

    def retrieve(self, queries: list[str]) -> list[list]:
        return self.retriever.retrieve(list(queries), self.n_passages)

    def prompt_with(self, prompt: str, passages) -> str:
        if self.template is None:
            from ..rag import rag_prompt

            return rag_prompt(passages, prompt)
        return self.template.format(passages="\n\n".join(p.text for p in passages), prompt=prompt)

    @classmethod
    def table_name(cls, row: dict) -> str:
        st = row.get("settings")
        if not st:
            return cls.name
        return f"rag (BM25 top-{st.get('n_passages')}, every {st.get('retrieve_every')} tokens)"
