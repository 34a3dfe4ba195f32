"""Human review of SFT candidates: a local web app, its decision journal, and `finalize`.

`datagen review SFT_DIR` serves the pending candidates of a build-sft dataset to a browser
(`datagen/review/static/`): raw and stylized videos side by side, the style references, both
captions and the scores, and accept / reject-with-a-reason decisions made from the keyboard.

Decisions are data. Each one is appended as a JSON line to `SFT_DIR/_review/decisions.jsonl`
and fsynced before the browser hears "saved", so a crash or a closed tab loses nothing; the
shards themselves are never modified. A decision names the revision of the sample it was based
on (how many decisions the sample had when the page showed it); a decision based on a stale
revision is refused (HTTP 409) so that two reviewers, or two tabs, never overwrite each other
silently - the page shows the other decision and lets the reviewer override it on purpose. An
exclusive file lock around read-check-append makes this hold across processes too (two
`datagen review` servers over one dataset).

`datagen review finalize SFT_DIR OUT` writes the accepted rows, with their review fields, as a
new SFT dataset through the ShardWriter, and the rejected ones as rejects (stage "review",
reason = the reviewer's reason code). OUT appears complete or not at all.

The modules: `journal` (decisions, their journal, the review's errors), `session` (the dataset
under review: listing, filters, media through a row-group cache), `app` (the web app, its
server, the links of a run summary), `finalize` (the reviewed dataset), `defaults` (where the
app listens; light enough for the CLI to import).
"""
