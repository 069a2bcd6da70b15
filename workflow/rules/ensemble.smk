# Fit on OOF (blend) and apply to the test set (apply_blend) are two jobs: a test-set change
# reruns apply_blend only, never the weights' search.
rule blend:
    input:
        oof_probs=lambda wildcards: expand(
            "{dir}/oof_probs.npy", dir=experiment_dirs("oof", wildcards.round)
        ),
        folds=rules.make_folds.output.folds,
        stats=rules.preprocess_train.output.stats,
        truths=rules.truth_masks.output.masks,
    output:
        oof_probs=result("oof", "ensemble", "round{round}", "oof_probs.npy"),
        oof_ids=result("oof", "ensemble", "round{round}", "oof_ids.csv"),
        metrics=result("oof", "ensemble", "round{round}", "metrics.json"),
        metrics_csv=result("oof", "ensemble", "round{round}", "metrics.csv"),
        weights=result("ensemble", "round{round}", "weights.json"),
        table=result("ensemble", "round{round}", "table.csv"),
    log:
        result("logs", "blend", "round{round}.log"),
    benchmark:
        result("benchmarks", "blend", "round{round}.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("blend", 1)
    resources:
        **job_resources("blend", mem_mb=8000, runtime=30),
    params:
        code=stage_fingerprint("blend"),
        names=RUN_EXPERIMENTS,
        oof_dirs=lambda wildcards, input: [os.path.dirname(p) for p in input.oof_probs],
        n_folds=N_FOLDS,
        # Recorded in the weights' provenance (as before the split); read by apply_blend.
        fold_merge=config["predict"]["fold_merge"],
        metric=config["postprocess"]["metric"],
        step=config["ensemble"]["weight_step"],
        mode=config["ensemble"]["mode"],
    shell:
        "segflow blend --names {params.names:q} --oof-dirs {params.oof_dirs:q}"
        " --n-folds {params.n_folds:q} --fold-merge {params.fold_merge:q}"
        " --metric {params.metric:q} --step {params.step:q} --mode {params.mode:q}"
        " --folds {input.folds:q} --stats {input.stats:q} --truths {input.truths:q}"
        " --out-oof {output.oof_probs:q}"
        " --out-weights {output.weights:q} 2> {log:q}"


rule apply_blend:
    input:
        weights=rules.blend.output.weights,
        # Its w_<name> columns keep the blend's experiment order (weights.json sorts keys).
        table=rules.blend.output.table,
        test_probs=lambda wildcards: expand(
            "{dir}/probs.npy", dir=experiment_dirs("test", wildcards.round)
        ),
        stats=rules.preprocess_train.output.stats,
    output:
        test_probs=result("test", "ensemble", "round{round}", "probs.npy"),
        test_ids=result("test", "ensemble", "round{round}", "ids.csv"),
    log:
        result("logs", "apply_blend", "round{round}.log"),
    benchmark:
        result("benchmarks", "apply_blend", "round{round}.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("apply_blend", 1)
    resources:
        **job_resources("apply_blend", mem_mb=8000, runtime=30),
    params:
        code=stage_fingerprint("apply-blend"),
        names=RUN_EXPERIMENTS,
        test_dirs=lambda wildcards, input: [
            os.path.dirname(p) for p in input.test_probs
        ],
        fold_merge=config["predict"]["fold_merge"],
    shell:
        "segflow apply-blend --names {params.names:q} --test-dirs {params.test_dirs:q}"
        " --fold-merge {params.fold_merge:q} --stats {input.stats:q}"
        " --weights {input.weights:q} --out-test {output.test_probs:q} 2> {log:q}"


rule select_pseudo:
    input:
        # Round r trains on round r-1's final test prediction: the ensemble, post-processed.
        test_probs=lambda wildcards: result(
            "test", "ensemble", f"round{int(wildcards.round) - 1}", "probs.npy"
        ),
        postprocess=lambda wildcards: result(
            "postprocess",
            "ensemble",
            f"round{int(wildcards.round) - 1}",
            "params.json",
        ),
        stats=rules.preprocess_train.output.stats,
        test_index=rules.preprocess_test.output.test_index,
        leaks=rules.leaks.output.leaks,
    output:
        selection=result("pseudo", "round{round}", "selection.csv"),
        targets=result("pseudo", "round{round}", "targets.npy"),
        summary=result("pseudo", "round{round}", "summary.json"),
    log:
        result("logs", "select_pseudo", "round{round}.log"),
    benchmark:
        result("benchmarks", "select_pseudo", "round{round}.tsv")
    wildcard_constraints:
        round=r"[1-9]\d*",
    conda:
        CONDA_ENV
    threads: rule_threads("select_pseudo", 1)
    resources:
        **job_resources("select_pseudo", mem_mb=8000, runtime=30),
    params:
        code=stage_fingerprint("select-pseudo"),
        flags=section_flags(
            "pseudo", exclude=("rounds", "max_pseudo_share", "pseudo_weight")
        ),
        test_dir=lambda wildcards, input: os.path.dirname(input.test_probs),
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        out_dir=lambda wildcards, output: os.path.dirname(output.selection),
    shell:
        "segflow select-pseudo --test-dir {params.test_dir:q} --postprocess {input.postprocess:q}"
        " --arrays-dir {params.arrays_dir:q} --dedup-items {input.leaks:q} {params.flags}"
        " --out-dir {params.out_dir:q} 2> {log:q}"


# One job per stacked candidate ({stacker}: gate or pixel), each with only its own options:
# both write into stack/round<R>/class_<k>/ (no file name shared) and a summary of their own.
# The fit reads the OOF side only; apply_stack applies its models to the test set, so a
# test-set change refits nothing.
rule stack:
    input:
        unpack(stack_inputs),
        oof_probs=expand("{dir}/oof_probs.npy", dir=experiment_dirs("oof", FINAL_ROUND)),
        oof_ids=expand("{dir}/oof_ids.csv", dir=experiment_dirs("oof", FINAL_ROUND)),
        folds=rules.make_folds.output.folds,
        stats=rules.preprocess_train.output.stats,
        train_images=rules.preprocess_train.output.train_images,
        index=rules.preprocess_train.output.index,
        manifest=rules.ingest_train.output.manifest,
        dedup_items=rules.dedup.output.dedup_items,
    output:
        oof=result("oof", "stack_{stacker}", f"round{FINAL_ROUND}", "oof_probs.npy"),
        oof_ids=result("oof", "stack_{stacker}", f"round{FINAL_ROUND}", "oof_ids.csv"),
        metrics=result("oof", "stack_{stacker}", f"round{FINAL_ROUND}", "metrics.json"),
        summary=result("stack", f"round{FINAL_ROUND}", "summary_{stacker}.json"),
    log:
        result("logs", "stack", "{stacker}.log"),
    benchmark:
        result("benchmarks", "stack", "{stacker}.tsv")
    wildcard_constraints:
        stacker="gate|pixel",
    conda:
        CONDA_ENV
    threads: rule_threads("stack", MAX_THREADS)
    resources:
        **job_resources("stack", mem_mb=16000, runtime=120),
    params:
        code=stage_fingerprint("stack"),
        names=RUN_EXPERIMENTS,
        oof_dirs=lambda wildcards, input: [os.path.dirname(p) for p in input.oof_probs],
        n_folds=N_FOLDS,
        fold_merge=config["predict"]["fold_merge"],
        stack_options=stack_flags,
        stack_base=stack_base_flags,
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    shell:
        "segflow stack --candidate {wildcards.stacker:q} --names {params.names:q}"
        " --oof-dirs {params.oof_dirs:q} --n-folds {params.n_folds:q}"
        " --fold-merge {params.fold_merge:q} {params.stack_base}"
        " --arrays-dir {params.arrays_dir:q} --folds {input.folds:q}"
        " --manifest {input.manifest:q} --dedup-items {input.dedup_items:q}"
        " {params.stack_options} --threads {threads} --out-dir {params.out_dir:q} 2> {log:q}"


rule apply_stack:
    input:
        unpack(apply_stack_inputs),
        summary=rules.stack.output.summary,
        # A function: with refit.test_models auto the test models follow the budget's plan.
        test_probs=lambda wildcards: expand(
            "{dir}/probs.npy", dir=experiment_dirs("test", FINAL_ROUND)
        ),
        stats=rules.preprocess_train.output.stats,
        test_images=rules.preprocess_test.output.test_images,
        test_index=rules.preprocess_test.output.test_index,
        test_manifest=rules.ingest_test.output.manifest,
    output:
        test=result("test", "stack_{stacker}", f"round{FINAL_ROUND}", "probs.npy"),
        test_ids=result("test", "stack_{stacker}", f"round{FINAL_ROUND}", "ids.csv"),
    log:
        result("logs", "apply_stack", "{stacker}.log"),
    benchmark:
        result("benchmarks", "apply_stack", "{stacker}.tsv")
    wildcard_constraints:
        stacker="gate|pixel",
    conda:
        CONDA_ENV
    threads: rule_threads("apply_stack", 1)
    resources:
        **job_resources("apply_stack", mem_mb=16000, runtime=60),
    params:
        code=stage_fingerprint("apply-stack"),
        names=RUN_EXPERIMENTS,
        test_dirs=lambda wildcards, input: [
            os.path.dirname(p) for p in input.test_probs
        ],
        fold_merge=config["predict"]["fold_merge"],
        apply_base=apply_stack_base_flags,
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        stack_dir=lambda wildcards, input: os.path.dirname(input.summary),
        out_dir=lambda wildcards, output: os.path.dirname(output.test),
    shell:
        "segflow apply-stack --candidate {wildcards.stacker:q} --names {params.names:q}"
        " --test-dirs {params.test_dirs:q} --fold-merge {params.fold_merge:q}"
        " {params.apply_base} --arrays-dir {params.arrays_dir:q}"
        " --test-manifest {input.test_manifest:q} --stack-dir {params.stack_dir:q}"
        " --out-dir {params.out_dir:q} 2> {log:q}"


rule choose:
    input:
        params=[
            result("postprocess", name, f"round{r}", "params.json")
            for name, r in candidates()
        ],
        metrics=[
            result("oof", name, f"round{r}", "metrics.json")
            for name, r in candidates()
        ],
        # Per-image scores, tuned against constant predictions (segflow.model.diagnostics).
        image_scores=[
            result("postprocess", name, f"round{r}", "image_scores.parquet")
            for name, r in candidates()
        ],
        # The searches' best values, next to their experiments' OOF (stages.csv search_best).
        search=search_files("best.json"),
    output:
        choice=result("final", "choice.json"),
        stages_csv=result("final", "stages.csv"),
        stages_md=result("final", "stages.md"),
    log:
        result("logs", "choose.log"),
    benchmark:
        result("benchmarks", "choose.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("choose", 1)
    resources:
        **job_resources("choose", mem_mb=4000, runtime=15),
    params:
        code=stage_fingerprint("choose"),
        candidates=[f"{name}:{r}" for name, r in candidates()],
        force=submit_flag(),
        # results/final/choice.json -> results
        results_dir=lambda wildcards, output: os.path.dirname(
            os.path.dirname(output.choice)
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.choice),
    shell:
        "segflow choose --candidates {params.candidates:q} --results-dir {params.results_dir:q}"
        " {params.force} --out-dir {params.out_dir:q} 2> {log:q}"


# Apart from choose: a submission-format option reruns this copy, not the choice or the report.
rule final_submission:
    input:
        choice=rules.choose.output.choice,
        submissions=[
            result("submission", name, f"round{r}", "submission.csv")
            for name, r in candidates()
        ],
    output:
        submission=result("final", "submission.csv"),
    log:
        result("logs", "final_submission.log"),
    benchmark:
        result("benchmarks", "final_submission.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("final_submission", 1)
    resources:
        **job_resources("final_submission", mem_mb=1000, runtime=5),
    params:
        code=stage_fingerprint("final-submission"),
        # results/final/choice.json -> results
        results_dir=lambda wildcards, input: os.path.dirname(
            os.path.dirname(input.choice)
        ),
    shell:
        "segflow final-submission --choice {input.choice:q} --results-dir {params.results_dir:q}"
        " --out {output.submission:q} 2> {log:q}"


# The final choice as a self-contained zip for a Kaggle code-competition notebook (segflow
# predict-bundle). Built on request (snakemake results/export/bundle.zip), not by `all`: it
# copies every bundled model's weights and only shipping needs it.
rule export_bundle:
    input:
        choice=rules.choose.output.choice,
        models=bundle_models,
        test_ids=lambda wildcards: expand(
            "{dir}/ids.csv", dir=bundle_test_dirs(wildcards)
        ),
        params=[
            result("postprocess", name, f"round{r}", "params.json")
            for name, r in candidates()
        ],
        weights=[result("ensemble", f"round{r}", "weights.json") for r in ROUNDS],
        tables=[result("ensemble", f"round{r}", "table.csv") for r in ROUNDS],
        # A stacked choice's fitted models (class_<k>/ next to each summary).
        stack=[
            result("stack", f"round{FINAL_ROUND}", f"summary_{stacker}.json")
            for stacker in STACKERS
        ],
        stats=rules.preprocess_train.output.stats,
        manifest=rules.ingest_train.output.manifest,
        # Its stored channel counts: the bundle accepts the images the pipeline predicted.
        test_manifest=rules.ingest_test.output.manifest,
        dedup_items=rules.dedup.output.dedup_items,
    output:
        bundle=result("export", "bundle.zip"),
    log:
        result("logs", "export_bundle.log"),
    benchmark:
        result("benchmarks", "export_bundle.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("export_bundle", 1)
    resources:
        **job_resources("export_bundle", mem_mb=4000, runtime=15),
    params:
        code=stage_fingerprint("export"),
        predict_options=section_flags("predict", exclude=("device",)),
        submission_options=section_flags("submission"),
        export_options=section_flags("export"),
        dicom=dicom_flags(),
        test_dirs=lambda wildcards, input: [os.path.dirname(p) for p in input.test_ids],
        # results/final/choice.json -> results
        results_dir=lambda wildcards, input: os.path.dirname(
            os.path.dirname(input.choice)
        ),
    shell:
        "segflow export {params.results_dir:q} {output.bundle:q} {params.predict_options}"
        " {params.submission_options} {params.export_options} {params.dicom}"
        " --test-dirs {params.test_dirs:q} 2> {log:q}"
