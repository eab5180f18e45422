"""The Report and its words: the vocabularies, the diagnosis's text, and the text/HTML views."""
