rule report:
    input:
        # Everything the report reads, so it is rebuilt whenever any of it changes.
        stages=rules.choose.output.stages_csv,
        choice=rules.choose.output.choice,
        dedup_summary=rules.dedup.output.summary,
        dedup_items=rules.dedup.output.dedup_items,
        manifest=rules.ingest_train.output.manifest,
        stats=rules.preprocess_train.output.stats,
        folds=rules.make_folds.output.folds,
        folds_summary=rules.make_folds.output.summary,
        histories=[
            result("models", name, f"round{r}", f"fold{fold}", "history.csv")
            for r in ROUNDS
            for name in RUN_EXPERIMENTS
            for fold in TRAIN_FOLDS
        ],
        model_metrics=[
            result("models", name, f"round{r}", f"fold{fold}", "metrics.json")
            for r in ROUNDS
            for name in RUN_EXPERIMENTS
            for fold in TRAIN_FOLDS
        ],
        oof=[
            result("oof", name, f"round{r}", filename)
            for name, r in candidates()
            for filename in ("metrics.json", "oof_probs.npy", "oof_ids.csv")
        ],
        grids=[
            result("postprocess", name, f"round{r}", "grid.csv")
            for name, r in candidates()
        ],
        search=search_files("trials.csv", "best.json", "importance.csv"),
        stack=[
            result("stack", f"round{FINAL_ROUND}", f"summary_{stacker}.json")
            for stacker in STACKERS
        ],
    output:
        report=result("report", "report.html"),
    log:
        result("logs", "report.log"),
    benchmark:
        result("benchmarks", "report.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("report", 1)
    resources:
        **job_resources("report", mem_mb=4000, runtime=15),
    params:
        code=stage_fingerprint("report"),
        # results/final/stages.csv -> results
        results_dir=lambda wildcards, input: os.path.dirname(
            os.path.dirname(input.stages)
        ),
        dicom=dicom_flags(),
    shell:
        "segflow report --results-dir {params.results_dir:q} {params.dicom}"
        " --out {output.report:q} 2> {log:q}"
