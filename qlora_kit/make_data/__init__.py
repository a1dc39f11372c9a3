"""make_data/: documents in, training rows out (`qlora-kit make-data`). Documents (PDF, DOCX, Markdown, text, HTML;
English and Chinese) are read into pages of light Markdown with running headers and page numbers removed
(`documents.py`), cut into chunks measured in the student model's tokens, and a teacher model behind any
OpenAI-compatible server writes Question / Complex_CoT / Response rows from each chunk, checked and resumable.
"""
