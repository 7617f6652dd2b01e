"""The batch job: :mod:`~raydetect.job.run` (``run_job``: list → open output → plan → run →
summary → report), :mod:`~raydetect.job.output` (the resumable output: manifest, shard plan,
exactly-once shard writer), :mod:`~raydetect.job.report`, :mod:`~raydetect.job.metrics`,
:mod:`~raydetect.job.results` (reading an output back) and :mod:`~raydetect.job.via_serve`
(the job through a running Serve application)."""
