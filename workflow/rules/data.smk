rule generate_demo_data:
    output:
        dataset=directory(DEMO["out_dir"]),
    log:
        result("logs", "generate_demo_data.log"),
    benchmark:
        result("benchmarks", "generate_demo_data.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("generate_demo_data", 1)
    resources:
        **job_resources("generate_demo_data", mem_mb=1000, runtime=10),
    params:
        code=stage_fingerprint("demo-data"),
        flags=section_flags("demo", exclude=("enabled", "out_dir")),
    shell:
        "segflow demo-data {output.dataset:q} {params.flags} 2> {log:q}"


# Train and test are ingested and preprocessed by separate jobs: nothing the folds or the
# round-0 models read depends on the test set, so new test images never retrain.
rule ingest_train:
    input:
        unpack(ingest_inputs("train")),
    output:
        manifest=result("ingest", "manifest.parquet"),
        summary=result("ingest", "summary.json"),
    log:
        result("logs", "ingest_train.log"),
    benchmark:
        result("benchmarks", "ingest_train.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("ingest_train", MAX_THREADS)
    resources:
        **job_resources("ingest_train", mem_mb=4000, runtime=60),
    params:
        code=stage_fingerprint("ingest"),
        data=data_stamp("train"),
        flags=section_flags("data", exclude=("test_images",)),
    shell:
        "segflow ingest --split train {params.flags} --workers {threads}"
        " --out-manifest {output.manifest:q} --out-summary {output.summary:q} 2> {log:q}"


rule ingest_test:
    input:
        unpack(ingest_inputs("test")),
        # Only its ids: a test id that is also a train id is refused.
        train_manifest=rules.ingest_train.output.manifest,
    output:
        manifest=result("ingest", "test_manifest.parquet"),
        summary=result("ingest", "test_summary.json"),
    log:
        result("logs", "ingest_test.log"),
    benchmark:
        result("benchmarks", "ingest_test.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("ingest_test", MAX_THREADS)
    resources:
        **job_resources("ingest_test", mem_mb=4000, runtime=60),
    params:
        code=stage_fingerprint("ingest"),
        data=data_stamp("test"),
        test_flags=ingest_test_flags(),
    shell:
        "segflow ingest --split test {params.test_flags} --train-manifest {input.train_manifest:q}"
        " --workers {threads} --out-manifest {output.manifest:q}"
        " --out-summary {output.summary:q} 2> {log:q}"


rule dedup:
    input:
        manifest=rules.ingest_train.output.manifest,
    output:
        dedup_items=result("dedup", "items.parquet"),
        summary=result("dedup", "summary.json"),
        report=result("dedup", "report.md"),
    log:
        result("logs", "dedup.log"),
    benchmark:
        result("benchmarks", "dedup.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("dedup", 1)
    resources:
        **job_resources("dedup", mem_mb=4000, runtime=60),
    params:
        code=stage_fingerprint("dedup"),
        flags=section_flags("dedup", exclude=NEAR_DUPLICATE_KEYS),
    shell:
        "segflow dedup --manifest {input.manifest:q} {params.flags}"
        " --out-items {output.dedup_items:q} --out-summary {output.summary:q}"
        " --out-report {output.report:q} 2> {log:q}"


# Test-side: the test items that are exact copies of train items (submit copies their labels).
rule leaks:
    input:
        test_manifest=rules.ingest_test.output.manifest,
        manifest=rules.ingest_train.output.manifest,
        dedup_items=rules.dedup.output.dedup_items,
    output:
        leaks=result("dedup", "test_leaks.parquet"),
        summary=result("dedup", "test_leaks.json"),
    log:
        result("logs", "leaks.log"),
    benchmark:
        result("benchmarks", "leaks.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("leaks", 1)
    resources:
        **job_resources("leaks", mem_mb=2000, runtime=10),
    params:
        code=stage_fingerprint("leaks"),
    shell:
        "segflow leaks --test-manifest {input.test_manifest:q} --manifest {input.manifest:q}"
        " --dedup-items {input.dedup_items:q} --out-leaks {output.leaks:q}"
        " --out-summary {output.summary:q} 2> {log:q}"


rule preprocess_train:
    input:
        # budget.sizes: the chosen size (plan_resolution); nothing otherwise.
        unpack(resolution_inputs),
        manifest=rules.ingest_train.output.manifest,
        dedup_items=rules.dedup.output.dedup_items,
    output:
        train_images=result("preprocess", "train_images.npy"),
        train_masks=result("preprocess", "train_masks.npy"),
        index=result("preprocess", "index.parquet"),
        stats=result("preprocess", "stats.json"),
    log:
        result("logs", "preprocess_train.log"),
    benchmark:
        result("benchmarks", "preprocess_train.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("preprocess_train", MAX_THREADS)
    resources:
        **job_resources("preprocess_train", mem_mb=8000, runtime=120),
    params:
        code=stage_fingerprint("preprocess"),
        flags=section_flags("preprocess"),
        resolution=resolution_flags(),
        dicom=dicom_flags(),
        out_dir=lambda wildcards, output: os.path.dirname(output.stats),
    shell:
        "segflow preprocess --manifest {input.manifest:q} --dedup-items {input.dedup_items:q}"
        " {params.flags} {params.resolution} {params.dicom} --workers {threads} --out-dir {params.out_dir:q} 2> {log:q}"


# The test images prepared as the train arrays were (the options and size of stats.json).
rule preprocess_test:
    input:
        test_manifest=rules.ingest_test.output.manifest,
        stats=rules.preprocess_train.output.stats,
    output:
        test_images=result("preprocess", "test_images.npy"),
        test_index=result("preprocess", "test_index.parquet"),
    log:
        result("logs", "preprocess_test.log"),
    benchmark:
        result("benchmarks", "preprocess_test.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("preprocess_test", MAX_THREADS)
    resources:
        **job_resources("preprocess_test", mem_mb=8000, runtime=120),
    params:
        code=stage_fingerprint("preprocess-test"),
        dicom=dicom_flags(),
        out_dir=lambda wildcards, output: os.path.dirname(output.test_index),
    shell:
        "segflow preprocess-test --test-manifest {input.test_manifest:q} --stats {input.stats:q}"
        " {params.dicom} --workers {threads} --out-dir {params.out_dir:q} 2> {log:q}"


rule make_folds:
    input:
        manifest=rules.ingest_train.output.manifest,
        dedup_items=rules.dedup.output.dedup_items,
    output:
        folds=result("folds", "folds.csv"),
        summary=result("folds", "summary.json"),
    log:
        result("logs", "make_folds.log"),
    benchmark:
        result("benchmarks", "make_folds.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("make_folds", 1)
    resources:
        **job_resources("make_folds", mem_mb=2000, runtime=10),
    params:
        code=stage_fingerprint("folds"),
        # train_folds is the workflow's (which folds train), not the split's.
        flags=section_flags("folds", exclude=("train_folds",)),
        near=near_duplicate_flags(),
    shell:
        "segflow folds --manifest {input.manifest:q} --dedup-items {input.dedup_items:q}"
        " {params.flags} {params.near} --out-folds {output.folds:q} --out-summary {output.summary:q} 2> {log:q}"


# The used train items' label masks at the original resolution, decoded once for the OOF
# stages (evaluate_oof, tune_postprocess, blend), which read their images' rows.
rule truth_masks:
    input:
        manifest=rules.ingest_train.output.manifest,
        dedup_items=rules.dedup.output.dedup_items,
    output:
        masks=result("truths", "masks.npy"),
        ids=result("truths", "ids.csv"),
    log:
        result("logs", "truth_masks.log"),
    benchmark:
        result("benchmarks", "truth_masks.tsv")
    conda:
        CONDA_ENV
    threads: rule_threads("truth_masks", 1)
    resources:
        **job_resources("truth_masks", mem_mb=4000, runtime=30),
    params:
        code=stage_fingerprint("truth-masks"),
        out_dir=lambda wildcards, output: os.path.dirname(output.masks),
    shell:
        "segflow truth-masks --manifest {input.manifest:q} --dedup-items {input.dedup_items:q}"
        " --out-dir {params.out_dir:q} 2> {log:q}"
