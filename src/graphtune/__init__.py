"""graphtune: find the compute-optimal multi-LLM collaboration graph for a task.

Subpackages: ``graphtune.graphs`` (the graph as data, costing, rendering),
``graphtune.envs`` (run a graph on questions and score it), ``graphtune.search``
(searchers and the search loop), ``graphtune.agent`` (the feedback agent),
``graphtune.store`` (SQL persistence). Heavy dependencies are imported lazily.
"""

__version__ = "0.1.0"
