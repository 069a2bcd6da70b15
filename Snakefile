from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"


rule all:
    default_target: True
    input:
        rules.preprocess_images.output,
        rules.make_folds.output,
        expand(
            result("oof", "{experiment}", "round0", "metrics.json"),
            experiment=RUN_EXPERIMENTS,
        ),
        expand(
            result("postprocess", "{experiment}", "round0", "params.json"),
            experiment=RUN_EXPERIMENTS,
        ),
        result("submission", SUBMIT_EXPERIMENT, "round0", "submission.csv"),
