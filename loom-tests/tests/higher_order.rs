//! Model l: a `create_graph` backward racing a publish of the parameters
//! it differentiates.

#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use loom_tests::check;
use netcl::Tensor;
use netcl::autograd::{self, BackwardOptions};
use netcl::nn::{Linear, Module, Published};

/// Model l: a trainer updates the weight of `y = w·x` (1 → 2) and publishes
/// it, while another thread runs the forward on the live weight, then a
/// double backward (`create_graph`): `f = y²`, `g = ∂f/∂x = 2w²x`,
/// `∂g/∂x = 2w²`. Whichever weight the forward saw, both derivatives use
/// that one (the graph's snapshot, never the weight swapped in meanwhile),
/// nothing deadlocks, and the published version is complete.
#[test]
fn create_graph_backward_vs_publish_sees_one_weight() {
    check("l: create_graph backward vs publish", || {
        let w = Tensor::from_vec(vec![1.0], &[1, 1])
            .unwrap()
            .requires_grad_(true);
        let model = Arc::new(Linear::from_parts(w.clone(), None).unwrap());
        let published = Arc::new(Published::new(&*model).unwrap());
        let trainer = {
            let (model, published) = (model.clone(), published.clone());
            thread::spawn(move || {
                for p in model.parameters() {
                    p.with_data_mut(|mut v| v.fill(2.0));
                }
                published.publish(&*model).unwrap();
            })
        };
        let x = Tensor::from_vec(vec![3.0], &[1, 1])
            .unwrap()
            .requires_grad_(true);
        let y = model.forward(&x).unwrap();
        let seen = y.item() / 3.0;
        assert!(seen == 1.0 || seen == 2.0, "weight {seen}");
        let f = (&y * &y).sum();
        let create = BackwardOptions::new().create_graph(true);
        let g = autograd::grad_with(&[&f], &[&x], &create).unwrap()[0]
            .clone()
            .unwrap();
        assert_eq!(g.item(), 2.0 * seen * seen * 3.0);
        let h = autograd::grad(&[&g.sum()], &[&x, &w]).unwrap();
        assert_eq!(h[0].item(), 2.0 * seen * seen);
        // ∂g/∂w = 4wx, at the weight the forward saw.
        assert_eq!(h[1].item(), 4.0 * seen * 3.0);
        trainer.join().unwrap();
        assert_eq!(published.version(), 1);
        assert_eq!(published.load().predict(&x).unwrap().item(), 6.0);
    });
}
