"""Transfer: fine-tuning, probing and fusion of pretrained bodies on downstream tasks.

    example         TaskExample, and Record (a row of a task file)
    kinds           task kinds as a registry, one module per kind: reading rows, encoding,
                    head outputs, loss, decoding and metrics (classification, pair,
                    tagging, regression, ...)
    tasks           Task, loading built-in, file and TFDS (GLUE) tasks
    pydocs_tasks    the built-in offline tasks derived from the Python documentation
    scores          the metric formulas (accuracy, macro-F1, MCC, Pearson/Spearman, span F1)
    encoding        task examples -> packed rows in a body's layout, batch streams
    heads           the task model: pretrained bodies, pooling, scalar mix, fusion, heads
    methods         fine-tuning methods as optimizer, schedule and update-mask choices
    trainer         the fine-tuning trainer (the pretraining loop with a task program)
    sweep           many fine-tuning runs (seeds, learning rates) as one vmapped program
    comparison      the comparison's downstream protocol: rate grid on dev, label fractions
    significance    Welch's test over seeds, paired bootstrap over test examples, power
    downstream_report  the downstream tables, verdict and plots of a comparison's report

`python -m pretrain.finetune` is the command (DESIGN.md section 11).
"""
