"""Training the reward models' score heads on the method's human preference annotations.

The backbone of a reward checkpoint stays frozen; only its scalar head ``score.weight``
(``[1, hidden]``, no bias) is trained, as a Bradley-Terry model over pairs built from the
human scores within a group. So the features (the backbone's pooled hidden states,
computed through the server's own forward) are extracted once and cached, and training is
seconds of CPU. Modules, in the order the pipeline uses them:

- ``data``: the preference files -> groups of rendered reward inputs; pairs; the split.
- ``features``: the placeholder image, feature extraction through the backend, the cache.
- ``bradley_terry``: deterministic full-batch training of one linear head.
- ``evaluate``: pairwise accuracy, the baselines, the hyperparameter search.
- ``pipeline``: one head end to end; ``report``: the table ``align2 train-heads`` prints.
"""
