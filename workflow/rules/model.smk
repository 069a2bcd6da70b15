wildcard_constraints:
    experiment=EXPERIMENT_NAME_PATTERN,
    round=r"\d+",
    fold=r"\d+",


rule train_fold:
    input:
        unpack(pseudo_inputs),
        unpack(budget_inputs),
        unpack(init_inputs),
        unpack(search_inputs),
        stats=rules.preprocess_train.output.stats,
        train_images=rules.preprocess_train.output.train_images,
        train_masks=rules.preprocess_train.output.train_masks,
        folds=rules.make_folds.output.folds,
    output:
        model=result("models", "{experiment}", "round{round}", "fold{fold}", "model.pt"),
        history=result(
            "models", "{experiment}", "round{round}", "fold{fold}", "history.csv"
        ),
        metrics=result(
            "models", "{experiment}", "round{round}", "fold{fold}", "metrics.json"
        ),
    log:
        result("logs", "train_fold", "{experiment}_round{round}_fold{fold}.log"),
    benchmark:
        result("benchmarks", "train_fold", "{experiment}_round{round}_fold{fold}.tsv")
    wildcard_constraints:
        experiment=EXPERIMENT_PATTERN,
    conda:
        CONDA_ENV
    threads: rule_threads("train_fold", MAX_THREADS)
    resources:
        **job_resources("train_fold", mem_mb=8000, runtime=240),
        gpu_slots=GPUS,
    params:
        code=stage_fingerprint("train"),
        experiment=experiment_json,
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
        # Outside the declared outputs: Snakemake deletes a failed job's outputs, not this.
        resume_dir=lambda wildcards: result(
            ".resume",
            wildcards.experiment,
            f"round{wildcards.round}",
            f"fold{wildcards.fold}",
        ),
        pseudo=pseudo_flags,
        budget=budget_flags,
        init=init_flags,
    shell:
        "segflow train --arrays-dir {params.arrays_dir:q} --folds {input.folds:q}"
        " --fold {wildcards.fold:q} --name {wildcards.experiment:q}"
        " --experiment {params.experiment:q} --out-dir {params.out_dir:q}"
        " --resume-dir {params.resume_dir:q} {params.pseudo} {params.init} {params.budget}"
        " --threads {threads}"
        " --gpus {resources.gpu_slots} 2> {log:q}"


# experiments.<name>.refit: after the folds, one model on every training image for the median
# of their best epochs, or under a time budget the plan's epochs (results/models/<name>/
# round<r>/full/).
rule train_full:
    input:
        unpack(pseudo_inputs),
        unpack(budget_inputs),
        unpack(init_inputs),
        unpack(search_inputs),
        stats=rules.preprocess_train.output.stats,
        train_images=rules.preprocess_train.output.train_images,
        train_masks=rules.preprocess_train.output.train_masks,
        folds=rules.make_folds.output.folds,
        fold_metrics=refit_fold_metrics,
    output:
        model=result("models", "{experiment}", "round{round}", FULL, "model.pt"),
        history=result("models", "{experiment}", "round{round}", FULL, "history.csv"),
        metrics=result("models", "{experiment}", "round{round}", FULL, "metrics.json"),
    log:
        result("logs", "train_full", "{experiment}_round{round}.log"),
    benchmark:
        result("benchmarks", "train_full", "{experiment}_round{round}.tsv")
    wildcard_constraints:
        experiment=EXPERIMENT_PATTERN,
    conda:
        CONDA_ENV
    threads: rule_threads("train_full", MAX_THREADS)
    resources:
        **job_resources("train_full", mem_mb=8000, runtime=240),
        gpu_slots=GPUS,
    params:
        code=stage_fingerprint("train"),
        experiment=experiment_json,
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
        # Outside the declared outputs: Snakemake deletes a failed job's outputs, not this.
        resume_dir=lambda wildcards: result(
            ".resume", wildcards.experiment, f"round{wildcards.round}", FULL
        ),
        pseudo=pseudo_flags,
        budget=budget_flags,
        init=init_flags,
    shell:
        "segflow train --arrays-dir {params.arrays_dir:q} --folds {input.folds:q}"
        " --refit-from {input.fold_metrics:q} --name {wildcards.experiment:q}"
        " --experiment {params.experiment:q} --out-dir {params.out_dir:q}"
        " --resume-dir {params.resume_dir:q} {params.pseudo} {params.init} {params.budget}"
        " --threads {threads} --gpus {resources.gpu_slots} 2> {log:q}"


rule predict_oof:
    input:
        model=rules.train_fold.output.model,
        stats=rules.preprocess_train.output.stats,
        train_images=rules.preprocess_train.output.train_images,
        folds=rules.make_folds.output.folds,
    output:
        probs=result("oof", "{experiment}", "round{round}", "fold{fold}", "probs.npy"),
        ids=result("oof", "{experiment}", "round{round}", "fold{fold}", "ids.csv"),
    log:
        result("logs", "predict_oof", "{experiment}_round{round}_fold{fold}.log"),
    benchmark:
        result("benchmarks", "predict_oof", "{experiment}_round{round}_fold{fold}.tsv")
    wildcard_constraints:
        experiment=EXPERIMENT_PATTERN,
    conda:
        CONDA_ENV
    threads: rule_threads("predict_oof", min(2, MAX_THREADS))
    resources:
        **job_resources("predict_oof", mem_mb=8000, runtime=60),
        gpu_slots=GPUS,
    params:
        code=stage_fingerprint("predict-oof"),
        flags=section_flags("predict", exclude=("fold_merge",)),
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        out_dir=lambda wildcards, output: os.path.dirname(output.probs),
    shell:
        "segflow predict-oof --arrays-dir {params.arrays_dir:q} --model {input.model:q}"
        " --fold {wildcards.fold:q} --folds {input.folds:q} {params.flags}"
        " --out-dir {params.out_dir:q} --threads {threads} --gpus {resources.gpu_slots} 2> {log:q}"


rule evaluate_oof:
    input:
        probs=lambda wildcards: expand(
            "{dir}/probs.npy",
            dir=fold_dirs("oof", wildcards.experiment, wildcards.round),
        ),
        folds=rules.make_folds.output.folds,
        stats=rules.preprocess_train.output.stats,
        truths=rules.truth_masks.output.masks,
    output:
        oof_probs=result("oof", "{experiment}", "round{round}", "oof_probs.npy"),
        oof_ids=result("oof", "{experiment}", "round{round}", "oof_ids.csv"),
        metrics=result("oof", "{experiment}", "round{round}", "metrics.json"),
        metrics_csv=result("oof", "{experiment}", "round{round}", "metrics.csv"),
    log:
        result("logs", "evaluate_oof", "{experiment}_round{round}.log"),
    benchmark:
        result("benchmarks", "evaluate_oof", "{experiment}_round{round}.tsv")
    wildcard_constraints:
        experiment=EXPERIMENT_PATTERN,
    conda:
        CONDA_ENV
    threads: rule_threads("evaluate_oof", 1)
    resources:
        **job_resources("evaluate_oof", mem_mb=8000, runtime=30),
    params:
        code=stage_fingerprint("evaluate-oof"),
        fold_dirs=lambda wildcards, input: [os.path.dirname(p) for p in input.probs],
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "segflow evaluate-oof --fold-dirs {params.fold_dirs:q} --folds {input.folds:q}"
        " --stats {input.stats:q} --truths {input.truths:q}"
        " --out-dir {params.out_dir:q} 2> {log:q}"


rule tune_postprocess:
    input:
        # The RLE CSV of the true objects, when the watershed is tuned from one.
        unpack(watershed_inputs),
        # From evaluate_oof for an experiment, from a second-level rule otherwise.
        oof_probs=result("oof", "{experiment}", "round{round}", "oof_probs.npy"),
        oof_ids=result("oof", "{experiment}", "round{round}", "oof_ids.csv"),
        stats=rules.preprocess_train.output.stats,
        truths=rules.truth_masks.output.masks,
    output:
        params=result("postprocess", "{experiment}", "round{round}", "params.json"),
        grid=result("postprocess", "{experiment}", "round{round}", "grid.csv"),
        # Per-image tuned and constant-prediction scores, for choose.
        image_scores=result(
            "postprocess", "{experiment}", "round{round}", "image_scores.parquet"
        ),
    log:
        result("logs", "tune_postprocess", "{experiment}_round{round}.log"),
    benchmark:
        result("benchmarks", "tune_postprocess", "{experiment}_round{round}.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("tune_postprocess", 1)
    resources:
        **job_resources("tune_postprocess", mem_mb=8000, runtime=30),
    params:
        code=stage_fingerprint("tune-postprocess"),
        thresholds=config["postprocess"]["thresholds"],
        min_areas=config["postprocess"]["min_areas"],
        fill_holes=config["postprocess"]["fill_holes_options"],
        gates=config["postprocess"]["gates"],
        metric=config["postprocess"]["metric"],
        watershed=watershed_flags(),
        oof_dir=lambda wildcards, input: os.path.dirname(input.oof_probs),
        out_dir=lambda wildcards, output: os.path.dirname(output.params),
    shell:
        "segflow tune-postprocess --oof-dir {params.oof_dir:q} --stats {input.stats:q}"
        " --truths {input.truths:q}"
        " --thresholds {params.thresholds:q} --min-areas {params.min_areas:q}"
        " --fill-holes-options {params.fill_holes:q} --gates {params.gates:q}"
        " --metric {params.metric:q} {params.watershed} --out-dir {params.out_dir:q} 2> {log:q}"


rule predict_test:
    input:
        model=rules.train_fold.output.model,
        stats=rules.preprocess_train.output.stats,
        test_images=rules.preprocess_test.output.test_images,
        test_index=rules.preprocess_test.output.test_index,
    output:
        probs=result("test", "{experiment}", "round{round}", "fold{fold}", "probs.npy"),
        ids=result("test", "{experiment}", "round{round}", "fold{fold}", "ids.csv"),
    log:
        result("logs", "predict_test", "{experiment}_round{round}_fold{fold}.log"),
    benchmark:
        result("benchmarks", "predict_test", "{experiment}_round{round}_fold{fold}.tsv")
    wildcard_constraints:
        experiment=EXPERIMENT_PATTERN,
    conda:
        CONDA_ENV
    threads: rule_threads("predict_test", min(2, MAX_THREADS))
    resources:
        **job_resources("predict_test", mem_mb=8000, runtime=60),
        gpu_slots=GPUS,
    params:
        code=stage_fingerprint("predict-test"),
        flags=section_flags("predict", exclude=("fold_merge",)),
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        out_dir=lambda wildcards, output: os.path.dirname(output.probs),
    shell:
        "segflow predict-test --arrays-dir {params.arrays_dir:q} --model {input.model:q}"
        " {params.flags} --out-dir {params.out_dir:q} --threads {threads}"
        " --gpus {resources.gpu_slots} 2> {log:q}"


rule predict_test_full:
    input:
        model=rules.train_full.output.model,
        stats=rules.preprocess_train.output.stats,
        test_images=rules.preprocess_test.output.test_images,
        test_index=rules.preprocess_test.output.test_index,
    output:
        probs=result("test", "{experiment}", "round{round}", FULL, "probs.npy"),
        ids=result("test", "{experiment}", "round{round}", FULL, "ids.csv"),
    log:
        result("logs", "predict_test_full", "{experiment}_round{round}.log"),
    benchmark:
        result("benchmarks", "predict_test_full", "{experiment}_round{round}.tsv")
    wildcard_constraints:
        experiment=EXPERIMENT_PATTERN,
    conda:
        CONDA_ENV
    threads: rule_threads("predict_test_full", min(2, MAX_THREADS))
    resources:
        **job_resources("predict_test_full", mem_mb=8000, runtime=60),
        gpu_slots=GPUS,
    params:
        code=stage_fingerprint("predict-test"),
        flags=section_flags("predict", exclude=("fold_merge",)),
        arrays_dir=lambda wildcards, input: os.path.dirname(input.stats),
        out_dir=lambda wildcards, output: os.path.dirname(output.probs),
    shell:
        "segflow predict-test --arrays-dir {params.arrays_dir:q} --model {input.model:q}"
        " {params.flags} --out-dir {params.out_dir:q} --threads {threads}"
        " --gpus {resources.gpu_slots} 2> {log:q}"


rule submit:
    input:
        probs=lambda wildcards: expand(
            "{dir}/probs.npy", dir=test_prediction_dirs(wildcards)
        ),
        postprocess=rules.tune_postprocess.output.params,
        stats=rules.preprocess_train.output.stats,
        manifest=rules.ingest_train.output.manifest,
        test_manifest=rules.ingest_test.output.manifest,
        leaks=rules.leaks.output.leaks,
    output:
        submission=result(
            "submission", "{experiment}", "round{round}", "submission.csv"
        ),
    log:
        result("logs", "submit", "{experiment}_round{round}.log"),
    benchmark:
        result("benchmarks", "submit", "{experiment}_round{round}.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("submit", 1)
    resources:
        **job_resources("submit", mem_mb=8000, runtime=30),
    params:
        code=stage_fingerprint("submit"),
        flags=section_flags("submission"),
        fold_merge=config["predict"]["fold_merge"],
        fold_dirs=lambda wildcards, input: [os.path.dirname(p) for p in input.probs],
    shell:
        "segflow submit --fold-dirs {params.fold_dirs:q} --fold-merge {params.fold_merge:q}"
        " --postprocess {input.postprocess:q} --stats {input.stats:q} --manifest {input.manifest:q}"
        " --test-manifest {input.test_manifest:q} --leaks {input.leaks:q} {params.flags}"
        " --out {output.submission:q} 2> {log:q}"
